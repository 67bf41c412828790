"""Every metric of the comparison, computed by one piece of code for every method.
Anything with `encode`/`decode` is scored alike: reconstruction, splicing, sparsity, concepts, steering.

- Reconstruction (on the stored activations, no model run): MSE (mean over tokens and
  dimensions), fraction of variance explained `1 - SSE / sum|x - mean|^2`, L0 (latents > 0 per
  token), dead fraction (latents never > 0 on the evaluation tokens), per-latent density.
- Splicing (the model re-run on the stored token ids): the activation at the hook is replaced by
  `decode(encode(x))` at every evaluated token (`run_with_hooks`); CE loss recovered =
  `(CE_zero_ablation - CE_spliced) / (CE_zero_ablation - CE_clean)`, where zero ablation sets the
  activation to 0 at the same tokens; KL = mean over tokens of KL(clean || spliced).
- Concepts (where each token has a label, e.g. the TokFSM state known there): precision and recall
  of every latent (active = activation > 0; for a codebook, among the chosen codes) for every label.
- Steering (TokFSM): force each target state's best latent at the prompt's last token (codebooks:
  force the code; SAEs: clamp it to its mean active value), with the method spliced in; success =
  the model's next generated state is a valid transition of the target state.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from tl_codebook.analysis.concepts import ConceptScores
from tl_codebook.comparisons.methods import TrainedMethod, _from_dict, as_method
from tl_codebook.comparisons.store import ActivationStore, StoreError
from tl_codebook.fsm.dataset import determined_states
from tl_codebook.fsm.machine import FSM
from tl_codebook.fsm.metrics import sample_sequences

STEERING_POSITIONS = ("last", "next_state")


@dataclass
class EvalConfig:
    """How methods are evaluated (the same for all of them)."""

    max_sequences: int | None = None
    """Evaluate on the first N sequences of the evaluation store (None: all)."""
    batch_sequences: int = 64
    precise_threshold: float = 0.9
    """A state has a precise latent when one latent has precision and recall >= this."""
    steering_prompts: int = 256
    steering_prompt_states: int = 3
    steering_temperature: float = 1.0
    steering_positions: str = "last"
    """"last": force at the prompt's last token (where its state becomes known);
    "next_state": at every position that predicts a digit of the next state."""
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        if self.steering_positions not in STEERING_POSITIONS:
            raise ValueError(
                f"EvalConfig.steering_positions={self.steering_positions!r} is not one of "
                f"{', '.join(STEERING_POSITIONS)}."
            )
        if not 0 <= self.precise_threshold <= 1:
            raise ValueError(
                f"EvalConfig.precise_threshold must be in [0, 1], got {self.precise_threshold}."
            )
        for name in ("batch_sequences", "steering_prompts", "steering_prompt_states"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"EvalConfig.{name} must be an integer >= 1, got {value!r}.")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EvalConfig:
        return _from_dict(cls, data)


@dataclass
class MethodEvaluation:
    """One method's scores: `row` (flat, JSON/CSV-ready) and `details` (per latent, per state)."""

    row: dict[str, Any]
    details: dict[str, Any]


# -- concepts ------------------------------------------------------------------------------------


def latent_concept_scores(
    joint_counts: Int[Tensor, "d_sae num_labels"],
    latent_counts: Int[Tensor, " d_sae"],
    label_counts: Int[Tensor, " num_labels"],
) -> ConceptScores:
    """Precision and recall of every latent for every label from counts, as `ConceptScores`
    with one group of d_sae "codes" (so `best_code_per_label` gives the best latent)."""
    joint = joint_counts.float()
    precision = joint / latent_counts.clamp(min=1)[:, None].float()
    recall = joint / label_counts.clamp(min=1).float()
    return ConceptScores(
        joint_counts=joint_counts[None],
        code_counts=latent_counts[None],
        label_counts=label_counts,
        precision=precision[None],
        recall=recall[None],
    )


def latent_concept_precision_recall(
    active: Bool[Tensor, "tokens d_sae"], labels: Int[Tensor, " tokens"], num_labels: int
) -> ConceptScores:
    """Precision and recall of every latent (active or not at each token) for every label.

    Labels < 0 mark tokens that are not counted. For a codebook's one-hot activations this is
    `code_concept_precision_recall` of its code ids.
    """
    joint, latent, label = _concept_counts(active, labels, num_labels)
    return latent_concept_scores(joint, latent, label)


def _concept_counts(
    active: Tensor, labels: Tensor, num_labels: int
) -> tuple[Tensor, Tensor, Tensor]:
    if labels.numel() and int(labels.max()) >= num_labels:
        raise ValueError(f"labels must be < num_labels={num_labels}, got {int(labels.max())}.")
    keep = labels >= 0
    on = active[keep].float()
    onehot = F.one_hot(labels[keep].long(), num_labels).float()
    joint = (on.T @ onehot).round().long()
    return joint, on.sum(0).round().long(), onehot.sum(0).round().long()


# -- splicing ------------------------------------------------------------------------------------


def splice_hook(
    transform: Callable[[Tensor], Tensor],
    where: Bool[Tensor, "batch pos"],
) -> Callable[[Tensor, Any], Tensor]:
    """A forward hook that replaces the activation by `transform(x)` at the tokens `where` is True.

    The activation is flattened to `[batch, pos, d_in]` for `transform` (e.g. hook_z's heads)
    and shaped back afterwards.
    """

    def hook(act: Tensor, hook: Any) -> Tensor:
        x = act.reshape(act.shape[0], act.shape[1], -1)
        out = torch.where(where[..., None].to(x.device), transform(x).to(x.dtype), x)
        return out.reshape(act.shape)

    return hook


def _evaluated_tokens(tokens: Tensor, exclude_token_ids: list[int]) -> Tensor:
    if not exclude_token_ids:
        return torch.ones_like(tokens, dtype=torch.bool)
    return ~torch.isin(tokens, torch.tensor(exclude_token_ids, device=tokens.device))


def _next_token_ce(logits: Tensor, tokens: Tensor) -> Tensor:
    """Summed next-token cross-entropy over every position but the last."""
    return F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten(), reduction="sum"
    )


@dataclass(frozen=True)
class SpliceBaseline:
    """The clean model's and the zero-ablated model's next-token loss on the evaluation tokens."""

    ce_clean: float
    ce_zero_ablation: float


@torch.no_grad()
def splice_baseline(
    model: Any,
    tokens: Int[Tensor, "n_seq pos"],
    hook_name: str,
    exclude_token_ids: list[int],
    batch_sequences: int = 64,
) -> SpliceBaseline:
    """CE of the clean model and of the model with the hook's activation zeroed (same tokens a
    method replaces; excluded tokens keep theirs)."""
    device = next(model.parameters()).device
    clean = zero = 0.0
    for batch in tokens.split(batch_sequences):
        batch = batch.to(device)
        clean += _next_token_ce(model(batch), batch).item()
        hook = splice_hook(torch.zeros_like, _evaluated_tokens(batch, exclude_token_ids))
        zero += _next_token_ce(
            model.run_with_hooks(batch, fwd_hooks=[(hook_name, hook)]), batch
        ).item()
    count = tokens.shape[0] * (tokens.shape[1] - 1)
    return SpliceBaseline(ce_clean=clean / count, ce_zero_ablation=zero / count)


@torch.no_grad()
def splice_metrics(
    method: TrainedMethod,
    model: Any,
    tokens: Int[Tensor, "n_seq pos"],
    hook_name: str,
    exclude_token_ids: list[int],
    baseline: SpliceBaseline,
    batch_sequences: int = 64,
) -> dict[str, float]:
    """CE with the method spliced in, CE loss recovered (zero-ablation baseline) and KL."""
    device = next(model.parameters()).device
    ce = kl = 0.0
    for batch in tokens.split(batch_sequences):
        batch = batch.to(device)
        clean = model(batch)
        hook = splice_hook(method.reconstruct, _evaluated_tokens(batch, exclude_token_ids))
        spliced = model.run_with_hooks(batch, fwd_hooks=[(hook_name, hook)])
        ce += _next_token_ce(spliced, batch).item()
        clean_lp = F.log_softmax(clean[:, :-1].float(), -1)
        spliced_lp = F.log_softmax(spliced[:, :-1].float(), -1)
        kl += (clean_lp.exp() * (clean_lp - spliced_lp)).sum().item()
    count = tokens.shape[0] * (tokens.shape[1] - 1)
    ce_spliced = ce / count
    span = baseline.ce_zero_ablation - baseline.ce_clean
    recovered = (baseline.ce_zero_ablation - ce_spliced) / span if span else math.nan
    return {
        "ce_clean": baseline.ce_clean,
        "ce_zero_ablation": baseline.ce_zero_ablation,
        "ce_spliced": ce_spliced,
        "ce_loss_recovered": recovered,
        "kl": kl / count,
    }


# -- steering ------------------------------------------------------------------------------------


def _steering_positions(prompt_len: int, digits: int, where: str) -> list[int]:
    if where == "last":
        return [prompt_len - 1]
    return list(range(prompt_len - 1, prompt_len - 1 + digits))


@torch.no_grad()
def steering_metrics(
    method: TrainedMethod,
    model: Any,
    fsm: FSM,
    hook_name: str,
    best_latent: Int[Tensor, " n_states"],
    active_value: Float[Tensor, " d_sae"],
    exclude_token_ids: list[int],
    config: EvalConfig,
) -> dict[str, float]:
    """Steer prompts in state s to a random other state s' through s'’s best latent.

    The same prompts and targets (seeded by `config.seed`) for every method. Returns
    `steering_success` (next state is a successor of s') and `steering_baseline` (the same with
    the method spliced in but nothing forced: how often a successor of s is one of s' by chance
    or by the model's errors). A state without a best latent (never seen) counts as a failure.
    """
    if fsm.n_states < 2:
        raise ValueError("Steering needs an FSM with at least 2 states.")
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(config.seed)
    n = config.steering_prompts
    walks = fsm.sample_trajectories(n, config.steering_prompt_states, generator)
    sources = walks[:, -1]
    targets = (sources + torch.randint(1, fsm.n_states, (n,), generator=generator)) % fsm.n_states
    prompts = fsm.trajectory_to_tokens(walks)
    prompt_len, digits = prompts.shape[1], fsm.digits_per_state
    positions = _steering_positions(prompt_len, digits, config.steering_positions)

    def runner(latent: int | None) -> Callable[[Tensor], Tensor]:
        def transform(x: Tensor) -> Tensor:
            out = method.reconstruct(x)
            if latent is not None:
                at = [p for p in positions if p < x.shape[1]]
                if at:
                    value = float(active_value[latent])
                    out[:, at] = method.steer(x[:, at], latent, value).to(out.dtype)
            return out

        def run(tokens: Tensor) -> Tensor:
            tokens = tokens.to(device)
            hook = splice_hook(transform, _evaluated_tokens(tokens, exclude_token_ids))
            return model.run_with_hooks(tokens, fwd_hooks=[(hook_name, hook)])

        return run

    def next_states(rows: Tensor, latent: int | None, gen: torch.Generator) -> Tensor:
        samples = sample_sequences(
            runner(latent), prompts[rows], prompt_len + digits, config.steering_temperature, gen
        )
        return fsm.tokens_to_states(samples)[:, -1]

    matrix = fsm.transition_matrix
    steered = torch.full((n,), -1, dtype=torch.long)
    sample_gen = torch.Generator().manual_seed(config.seed + 1)
    for target in targets.unique().tolist():
        rows = targets == target
        latent = int(best_latent[target])
        if latent >= 0:
            steered[rows] = next_states(rows, latent, sample_gen)
    baseline = next_states(torch.ones(n, dtype=torch.bool), None, sample_gen)

    def rate(states: Tensor) -> float:
        valid = states >= 0
        return (valid & matrix[targets, states.clamp(min=0)]).float().mean().item()

    return {"steering_success": rate(steered), "steering_baseline": rate(baseline)}


# -- the one function ----------------------------------------------------------------------------


def _density_histogram(density: Tensor, bins: int = 24) -> dict[str, Any]:
    """Histogram of log10(firing frequency) of the live latents, and the dead count."""
    live = density[density > 0]
    edges = torch.linspace(-6.0, 0.0, bins + 1)
    counts = torch.histc(live.log10().clamp(-6.0, 0.0), bins=bins, min=-6.0, max=0.0)
    return {
        "log10_edges": edges.tolist(),
        "counts": counts.long().tolist(),
        "dead": int((density == 0).sum()),
    }


@torch.no_grad()
def evaluate_method(
    method: Any,
    store: ActivationStore,
    hook_name: str,
    model: Any = None,
    fsm: FSM | None = None,
    exclude_token_ids: list[int] | None = None,
    config: EvalConfig | None = None,
    baseline: SpliceBaseline | None = None,
) -> MethodEvaluation:
    """Score `method` on the evaluation `store` at `hook_name` (every metric, the same way).

    Reconstruction and sparsity read the stored activations; with `model` the CE/KL metrics
    splice the method into it on the stored token ids; with `fsm` the concept metrics label each
    token with the TokFSM state known there, and (with a model too) the steering metrics run.
    Without them those fields are NaN. `baseline` (CE clean and zero-ablated) is computed when
    not given.
    """
    config = config or EvalConfig()
    exclude = [int(t) for t in (exclude_token_ids or [])]
    method = as_method(method)
    d_in = store.d_in(hook_name)
    if method.d_in != d_in:
        raise ValueError(
            f"Method {method.name!r} has d_in={method.d_in}, but the store's activations at "
            f"{hook_name!r} have width {d_in}."
        )
    if method.hook_name not in (None, hook_name):
        raise ValueError(
            f"Method {method.name!r} was trained at {method.hook_name!r}, not at {hook_name!r}."
        )
    if model is not None:
        store.check_compatible(model=model)
    d_sae, num_labels = method.d_sae, fsm.n_states if fsm is not None else 0
    sse = sum_x2 = 0.0
    sum_x = torch.zeros(d_in, dtype=torch.float64)
    fires = torch.zeros(d_sae, dtype=torch.float64)
    act_sum = torch.zeros(d_sae, dtype=torch.float64)
    joint = torch.zeros(d_sae, max(num_labels, 1), dtype=torch.long)
    latent_counts = torch.zeros(d_sae, dtype=torch.long)
    label_counts = torch.zeros(max(num_labels, 1), dtype=torch.long)
    n_tokens, l0_sum = 0, 0.0
    all_tokens = []
    n_seq = store.n_sequences if config.max_sequences is None else config.max_sequences
    bar = tqdm(
        total=min(n_seq, store.n_sequences),
        desc=f"evaluate {method.name}",
        disable=not config.progress,
        unit="seq",
        dynamic_ncols=True,
    )
    device = _device_of(method)
    for tokens, acts in store.iter_sequences(hook_name, config.batch_sequences, n_seq):
        all_tokens.append(tokens)
        keep = _evaluated_tokens(tokens, exclude)
        x = acts[keep].to(device)
        latents = method.encode(x)
        if latents.shape[-1] != d_sae:
            raise ValueError(
                f"Method {method.name!r} says d_sae={d_sae} but encode gave width "
                f"{latents.shape[-1]}."
            )
        recon = method.decode(latents).float()
        x64, latents = x.double().cpu(), latents.float().cpu()
        sse += (recon.double().cpu() - x64).pow(2).sum().item()
        sum_x += x64.sum(0)
        sum_x2 += x64.pow(2).sum().item()
        active = latents > 0
        fires += active.sum(0).double()
        act_sum += torch.where(active, latents, 0.0).sum(0).double()
        l0_sum += active.sum().item()
        n_tokens += x.shape[0]
        if fsm is not None:
            labels = determined_states(fsm, tokens)[keep]
            j, lat, lab = _concept_counts(active, labels, num_labels)
            joint += j
            latent_counts += lat
            label_counts += lab
        bar.update(tokens.shape[0])
    bar.close()
    if n_tokens == 0:
        raise StoreError(f"The store at {store.path} has no tokens to evaluate after exclusions.")
    sst = sum_x2 - (sum_x.pow(2).sum().item() / n_tokens)
    density = (fires / n_tokens).float()
    active_value = (act_sum / fires.clamp(min=1)).float()
    row: dict[str, Any] = {
        "method": method.name,
        "kind": method.kind,
        "hook_name": hook_name,
        "d_in": d_in,
        "d_sae": d_sae,
        "l0": l0_sum / n_tokens,
        "mse": sse / (n_tokens * d_in),
        "fve": 1.0 - sse / sst if sst > 0 else math.nan,
        "dead_fraction": float((fires == 0).double().mean()),
        "eval_tokens": n_tokens,
        "train_tokens": method.train_tokens,
        "train_seconds": method.train_seconds,
        "tokens_per_second": method.tokens_per_second,
        "init_tokens": method.init_tokens,
        "init_seconds": method.init_seconds,
    }
    details: dict[str, Any] = {
        "density": density.tolist(),
        "density_histogram": _density_histogram(density),
        "active_value": active_value.tolist(),
    }
    row.update(dict.fromkeys(("ce_clean", "ce_zero_ablation", "ce_spliced"), math.nan))
    row.update(ce_loss_recovered=math.nan, kl=math.nan)
    tokens = torch.cat(all_tokens)
    if model is not None:
        if baseline is None:
            baseline = splice_baseline(model, tokens, hook_name, exclude, config.batch_sequences)
        row.update(
            splice_metrics(
                method, model, tokens, hook_name, exclude, baseline, config.batch_sequences
            )
        )
    row.update(
        states_with_precise_latent=math.nan,
        mean_best_precision=math.nan,
        mean_best_recall=math.nan,
        steering_success=math.nan,
        steering_baseline=math.nan,
    )
    if fsm is not None:
        scores = latent_concept_scores(joint, latent_counts, label_counts)
        best = scores.best_code_per_label("f1")
        seen = label_counts > 0
        if seen.any():
            row["states_with_precise_latent"] = scores.fraction_of_labels_with_precise_code(
                config.precise_threshold
            )
            row["mean_best_precision"] = best.precision[seen].mean().item()
            row["mean_best_recall"] = best.recall[seen].mean().item()
        details["per_state"] = [
            {
                "state": s,
                "latent": int(best.code[s]),
                "precision": float(best.precision[s]) if seen[s] else math.nan,
                "recall": float(best.recall[s]) if seen[s] else math.nan,
                "count": int(label_counts[s]),
            }
            for s in range(num_labels)
        ]
        if model is not None:
            row.update(
                steering_metrics(
                    method, model, fsm, hook_name, best.code, active_value, exclude, config
                )
            )
    return MethodEvaluation(row=row, details=details)


def _device_of(method: TrainedMethod) -> torch.device:
    for owner in (method.codebook, method.sae):
        if isinstance(owner, torch.nn.Module):
            for p in owner.parameters():
                return p.device
    return torch.device("cpu")
