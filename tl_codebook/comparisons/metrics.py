"""Every metric of the comparison, computed by one piece of code for every method.
Anything with `encode`/`decode` is scored alike: reconstruction, splicing, sparsity, concepts, steering.

Where SAELens has a metric, ours is SAELens' own definition (`sae_lens.evals.run_evals`, tested
to agree to float tolerance) and carries SAELens' name. Tokens whose id is in
`exclude_token_ids` (e.g. BOS) are left out of every mean, as SAELens' `exclude_special_tokens`.

- Reconstruction (on the stored activations, no model run): `mse` = mean over tokens of
  `||x - x̂||²` (summed over dimensions, SAELens' "mse"), `explained_variance` =
  `1 - mse / (E||x||² - ||E x||²)` (SAELens' R²; 1 or 0 when the activations do not vary),
  `l0` = latents != 0 per token, `dead_fraction` = latents never != 0 on the evaluation tokens,
  per-latent density.
- Splicing (the model re-run on the stored token ids): `ce_loss_with_sae` = next-token CE with
  the activation replaced by `decode(encode(x))` at every non-excluded position;
  `ce_loss_without_sae` the clean model's; `ce_loss_with_ablation` with the activation zeroed at
  EVERY position (excluded ones too, as SAELens); each a mean over the predictions made at
  non-excluded positions. `ce_loss_score = (CE_ablation - CE_sae) / (CE_ablation - CE_clean)`.
  `kl_div_with_sae` = mean over non-excluded positions (the last one included) of
  KL(clean || spliced); `kl_div_with_ablation` likewise; `kl_div_score` = 1 - their ratio.
- Concepts (with a `Task`: each position's concept label): precision and recall of every latent
  (active = activation != 0; for a codebook, among the chosen codes) for every concept, by
  `analysis.concepts.active_concept_precision_recall` (the counter the code cache uses too).
- Steering (with a `Task` that has a steering measure, and a model): the task's prompts, each
  steered to a target concept through that concept's best latent, forced at the task's positions
  (codebooks: the code, as `force_codes` does; SAEs: the latent clamped to its mean active value)
  with the method spliced in; success is the task's check of the generated continuation.

Aliases, kept for comparison.json readers of earlier versions (same numbers, documented here):
`fve` = `explained_variance`, `ce_loss_recovered` = `ce_loss_score`, `kl` = `kl_div_with_sae`,
`states_with_precise_latent` = `concepts_with_precise_latent`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from tl_codebook.analysis.concepts import ConceptScores, active_concept_precision_recall
from tl_codebook.comparisons.methods import TrainedMethod, as_method
from tl_codebook.comparisons.store import ActivationStore, StoreError
from tl_codebook.configs import check_choice, dataclass_from_dict
from tl_codebook.tasks import SteeringTrials, Task, model_device, sample_sequences

STEERING_POSITIONS = ("last", "generation")
"""Where steering forces a latent: "last" at the task's steering positions (for TokFSM the
prompt's last token, where its state becomes known); "generation" from there on at every position
that predicts one of the generated tokens."""

ALIASES = {
    "fve": "explained_variance",
    "ce_loss_recovered": "ce_loss_score",
    "kl": "kl_div_with_sae",
    "states_with_precise_latent": "concepts_with_precise_latent",
}
"""Older column name -> the SAELens-named (or task-neutral) column it repeats."""

SPLICE_COLUMNS = (
    "ce_loss_without_sae",
    "ce_loss_with_ablation",
    "ce_loss_with_sae",
    "ce_loss_score",
    "kl_div_with_sae",
    "kl_div_with_ablation",
    "kl_div_score",
)
CONCEPT_COLUMNS = ("concepts_with_precise_latent", "mean_best_precision", "mean_best_recall")
STEERING_COLUMNS = ("steering_success", "steering_baseline")


@dataclass
class EvalConfig:
    """How methods are evaluated (the same for all of them).

    Raises:
        ValueError: on construction, for an unknown `steering_positions`, `precise_threshold`
            outside [0, 1], `batch_sequences` or `steering_prompts` that is not an integer >= 1,
            `max_sequences < 1`, or a negative or non-finite `steering_temperature`.
    """

    max_sequences: int | None = None
    """Evaluate on the first N sequences of the evaluation store (None: all)."""
    batch_sequences: int = 64
    """Sequences read from the store (and spliced into the model) at once."""
    precise_threshold: float = 0.9
    """A concept has a precise latent when one latent has precision and recall >= this."""
    steering_prompts: int = 256
    """Prompts steered per method (each towards a concept other than its own)."""
    steering_temperature: float = 1.0
    """Sampling temperature of the steered continuations (0: greedy)."""
    steering_positions: str = "last"
    """See `STEERING_POSITIONS`."""
    seed: int = 0
    """Seeds the steering prompts and the sampling."""
    progress: bool = True
    """Show progress bars."""

    def __post_init__(self) -> None:
        check_choice("EvalConfig.steering_positions", self.steering_positions, STEERING_POSITIONS)
        if not 0 <= self.precise_threshold <= 1:
            raise ValueError(
                f"EvalConfig.precise_threshold must be in [0, 1], got {self.precise_threshold}."
            )
        for name in ("batch_sequences", "steering_prompts"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"EvalConfig.{name} must be an integer >= 1, got {value!r}.")
        if self.max_sequences is not None and self.max_sequences < 1:
            raise ValueError(
                f"EvalConfig.max_sequences must be >= 1 or None, got {self.max_sequences!r}."
            )
        if not (math.isfinite(self.steering_temperature) and self.steering_temperature >= 0):
            raise ValueError(
                f"EvalConfig.steering_temperature must be finite and >= 0, got "
                f"{self.steering_temperature!r}."
            )

    def to_dict(self) -> dict[str, Any]:
        """The config as a JSON-ready dict (the inverse of `from_dict`)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EvalConfig:
        """The config a dict from `to_dict` describes.

        Raises:
            ValueError: for an unknown key, a value of the wrong type, or any check of the
                class.
        """
        return dataclass_from_dict(cls, data)


@dataclass
class MethodEvaluation:
    """One method's scores: `row` (flat, JSON/CSV-ready) and `details` (per latent, per concept)."""

    row: dict[str, Any]
    details: dict[str, Any]


# -- splicing ------------------------------------------------------------------------------------


def splice_hook(
    transform: Callable[[Tensor], Tensor],
    where: Bool[Tensor, "batch pos"] | None = None,
) -> Callable[[Tensor, Any], Tensor]:
    """A forward hook that replaces the activation by `transform(x)` (at the tokens `where` is
    True; None: everywhere).

    The activation is flattened to `[batch, pos, d_in]` for `transform` (e.g. hook_z's heads)
    and shaped back afterwards.
    """

    def hook(act: Tensor, hook: Any) -> Tensor:
        x = act.reshape(act.shape[0], act.shape[1], -1)
        out = transform(x).to(x.dtype)
        if where is not None:
            out = torch.where(where[..., None].to(x.device), out, x)
        return out.reshape(act.shape)

    return hook


def evaluated_tokens(
    tokens: Int[Tensor, "batch pos"], exclude_token_ids: Sequence[int]
) -> Bool[Tensor, "batch pos"]:
    """True at every token whose id is not excluded (the positions every metric counts)."""
    if not exclude_token_ids:
        return torch.ones_like(tokens, dtype=torch.bool)
    return ~torch.isin(tokens, torch.tensor(list(exclude_token_ids), device=tokens.device))


def _next_token_ce(logits: Tensor, tokens: Tensor, keep: Tensor) -> tuple[float, int]:
    """(sum, count) of next-token CE over the predictions made at kept positions."""
    ce = F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten(), reduction="none"
    )
    mask = keep[:, :-1].flatten()
    return ce[mask].sum().item(), int(mask.sum())


def _kl_sum(clean: Tensor, other: Tensor, keep: Tensor) -> float:
    """Sum over kept positions of KL(clean || other) of the next-token distributions."""
    clean_lp = F.log_softmax(clean.float(), -1)
    other_lp = F.log_softmax(other.float(), -1)
    kl = (clean_lp.exp() * (clean_lp - other_lp)).sum(-1)
    return kl[keep].sum().item()


@dataclass(frozen=True)
class SpliceBaseline:
    """The clean and the zero-ablated model on the evaluation tokens (shared by every method)."""

    ce_loss_without_sae: float
    ce_loss_with_ablation: float
    kl_div_with_ablation: float


@torch.no_grad()
def splice_baseline(
    model: Any,
    tokens: Int[Tensor, "n_seq pos"],
    hook_name: str,
    exclude_token_ids: Sequence[int],
    batch_sequences: int = 64,
) -> SpliceBaseline:
    """CE of the clean model, and CE and KL of the model with the hook's activation zeroed at
    every position (as SAELens ablates), each averaged over the non-excluded positions."""
    device = model_device(model)
    clean_ce = zero_ce = zero_kl = 0.0
    n_ce = n_kl = 0
    for batch in tokens.split(batch_sequences):
        batch = batch.to(device)
        keep = evaluated_tokens(batch, exclude_token_ids)
        clean = model(batch)
        zero = model.run_with_hooks(batch, fwd_hooks=[(hook_name, splice_hook(torch.zeros_like))])
        total, count = _next_token_ce(clean, batch, keep)
        clean_ce, n_ce = clean_ce + total, n_ce + count
        zero_ce += _next_token_ce(zero, batch, keep)[0]
        zero_kl += _kl_sum(clean, zero, keep)
        n_kl += int(keep.sum())
    if n_ce == 0:
        raise ValueError(
            "No next-token prediction is made at a non-excluded position: every position but "
            f"the last is excluded (exclude_token_ids={list(exclude_token_ids)})."
        )
    return SpliceBaseline(
        ce_loss_without_sae=clean_ce / n_ce,
        ce_loss_with_ablation=zero_ce / n_ce,
        kl_div_with_ablation=zero_kl / n_kl,
    )


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else math.nan


@torch.no_grad()
def splice_metrics(
    method: TrainedMethod,
    model: Any,
    tokens: Int[Tensor, "n_seq pos"],
    hook_name: str,
    exclude_token_ids: Sequence[int],
    baseline: SpliceBaseline,
    batch_sequences: int = 64,
) -> dict[str, float]:
    """CE and KL with the method spliced in at the non-excluded positions, and SAELens' scores."""
    device = model_device(model)
    ce = kl = 0.0
    n_ce = n_kl = 0
    for batch in tokens.split(batch_sequences):
        batch = batch.to(device)
        keep = evaluated_tokens(batch, exclude_token_ids)
        clean = model(batch)
        hook = splice_hook(method.reconstruct, keep)
        spliced = model.run_with_hooks(batch, fwd_hooks=[(hook_name, hook)])
        total, count = _next_token_ce(spliced, batch, keep)
        ce, n_ce = ce + total, n_ce + count
        kl, n_kl = kl + _kl_sum(clean, spliced, keep), n_kl + int(keep.sum())
    ce_sae, kl_sae = ce / max(n_ce, 1), kl / max(n_kl, 1)
    ablation, clean_ce = baseline.ce_loss_with_ablation, baseline.ce_loss_without_sae
    return {
        "ce_loss_without_sae": clean_ce,
        "ce_loss_with_ablation": ablation,
        "ce_loss_with_sae": ce_sae,
        "ce_loss_score": _ratio(ablation - ce_sae, ablation - clean_ce),
        "kl_div_with_sae": kl_sae,
        "kl_div_with_ablation": baseline.kl_div_with_ablation,
        "kl_div_score": _ratio(
            baseline.kl_div_with_ablation - kl_sae, baseline.kl_div_with_ablation
        ),
    }


def explained_variance(sse: float, sum_x: Tensor, sum_x2: float, n_tokens: int) -> float:
    """SAELens' R² from streamed sums: 1 - (SSE / n) / (E||x||² - ||E x||²); when the
    activations do not vary (variance < 1e-10) 1 if the error is that small too, else 0."""
    mse = sse / n_tokens
    total_variance = sum_x2 / n_tokens - (sum_x / n_tokens).pow(2).sum().item()
    if total_variance < 1e-10:
        return 1.0 if mse < 1e-10 else 0.0
    return 1.0 - mse / total_variance


# -- steering ------------------------------------------------------------------------------------


def steering_positions(trials: SteeringTrials, where: str) -> list[int]:
    """The positions a latent is forced at (see `STEERING_POSITIONS`)."""
    check_choice("steering_positions", where, STEERING_POSITIONS)
    if where == "last":
        return sorted(trials.positions)
    return list(range(min(trials.positions), trials.total_len - 1))


@torch.no_grad()
def steering_metrics(
    method: TrainedMethod,
    model: Any,
    task: Task,
    hook_name: str,
    best_latent: Int[Tensor, " num_concepts"],
    active_value: Float[Tensor, " d_sae"],
    exclude_token_ids: Sequence[int],
    config: EvalConfig,
) -> dict[str, float]:
    """Steer the task's prompts to their target concepts through each target's best latent.

    The same prompts and targets (`task.steering_trials`, seeded by `config.seed`) for every
    method. Returns `steering_success` (the task's check of the continuation) and
    `steering_baseline` (the same with the method spliced in but nothing forced: how often the
    continuation fits the target by chance). A target without a best latent (never seen in the
    evaluation tokens) counts as a failure.
    """
    device = model_device(model)
    trials = task.steering_trials(config.steering_prompts, seed=config.seed)
    positions = steering_positions(trials, config.steering_positions)

    def runner(latent: int | None) -> Callable[[Tensor], Tensor]:
        def transform(x: Tensor) -> Tensor:
            out = method.reconstruct(x)
            at = [p for p in positions if p < x.shape[1]]
            if latent is not None and at:
                value = float(active_value[latent])
                out[:, at] = method.steer(x[:, at], latent, value).to(out.dtype)
            return out

        def run(tokens: Tensor) -> Tensor:
            tokens = tokens.to(device)
            hook = splice_hook(transform, evaluated_tokens(tokens, exclude_token_ids))
            return model.run_with_hooks(tokens, fwd_hooks=[(hook_name, hook)])

        return run

    generator = torch.Generator().manual_seed(config.seed + 1)

    def success(rows: Tensor, latent: int | None) -> Tensor:
        subset = trials.subset(rows)
        generated = sample_sequences(
            runner(latent), subset.prompts, trials.total_len, config.steering_temperature, generator
        )
        return task.steering_success(subset, generated)

    steered = torch.zeros(trials.n, dtype=torch.bool)
    for target in trials.targets.unique().tolist():
        rows = trials.targets == target
        latent = int(best_latent[target])
        if latent >= 0:
            steered[rows] = success(rows, latent)
    baseline = success(torch.ones(trials.n, dtype=torch.bool), None)
    return {
        "steering_success": steered.float().mean().item(),
        "steering_baseline": baseline.float().mean().item(),
    }


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


def _concept_fields(
    scores: ConceptScores, task: Task, threshold: float
) -> tuple[dict[str, float], list[dict[str, Any]], Tensor]:
    """(row fields, per-concept details, best latent per concept) from the latents' scores."""
    best = scores.best_code_per_label("f1")
    seen = scores.label_counts > 0
    fields = dict.fromkeys(CONCEPT_COLUMNS, math.nan)
    if seen.any():
        fields = {
            "concepts_with_precise_latent": scores.fraction_of_labels_with_precise_code(threshold),
            "mean_best_precision": best.precision[seen].mean().item(),
            "mean_best_recall": best.recall[seen].mean().item(),
        }
    per_concept = [
        {
            "concept": c,
            "name": name,
            "latent": int(best.code[c]),
            "precision": float(best.precision[c]) if seen[c] else math.nan,
            "recall": float(best.recall[c]) if seen[c] else math.nan,
            "count": int(scores.label_counts[c]),
        }
        for c, name in enumerate(task.concept_names)
    ]
    return fields, per_concept, best.code


@torch.no_grad()
def evaluate_method(
    method: Any,
    store: ActivationStore,
    hook_name: str,
    model: Any = None,
    task: Task | None = None,
    exclude_token_ids: Sequence[int] | None = None,
    config: EvalConfig | None = None,
    baseline: SpliceBaseline | None = None,
) -> MethodEvaluation:
    """Score `method` on the evaluation `store` at `hook_name` (every metric, the same way).

    Reconstruction and sparsity read the stored activations; with `model` the CE/KL metrics
    splice the method into it on the stored token ids; with `task` the concept metrics label each
    token with the task's concepts, and (with a model, if the task has a steering measure) the
    steering metrics run. Fields that are not computed are NaN. `exclude_token_ids` (default:
    the task's, or none) are left out of every mean. `baseline` (the clean and zero-ablated
    model) is computed when not given.

    Args:
        method: a `TrainedMethod`, `Codebook`, SAELens SAE or any object `as_method` accepts.
        store: the evaluation activations (`[n_seq, pos, d_in]` at `hook_name`).
        hook_name: the store's hook the method reconstructs.
        model: the model the store was built from, for the CE/KL and steering metrics.
        task: concept labels and the steering measure.
        exclude_token_ids: token ids left out of every mean.
        config: how to evaluate (default `EvalConfig()`).
        baseline: the clean and zero-ablated model's losses, to share between methods.

    Returns:
        A `MethodEvaluation`: `row` (flat scores, JSON/CSV-ready) and `details` (per latent,
            per concept).

    Raises:
        ValueError: if the method's `d_in` is not the store's width at `hook_name`, it was
            trained at another hook, or its `encode` gives another width than its `d_sae`.
        StoreError: for a hook the store does not hold, or a `model` the store was not built
            from.
        TypeError: for a method `as_method` cannot wrap.
    """
    config = config or EvalConfig()
    if exclude_token_ids is None:
        exclude_token_ids = task.exclude_token_ids if task is not None else []
    exclude = [int(t) for t in exclude_token_ids]
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
    d_sae = method.d_sae
    sse = sum_x2 = 0.0
    sum_x = torch.zeros(d_in, dtype=torch.float64)
    fires = torch.zeros(d_sae, dtype=torch.float64)
    act_sum = torch.zeros(d_sae, dtype=torch.float64)
    concepts: ConceptScores | None = None
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
        keep = evaluated_tokens(tokens, exclude)
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
        active = latents != 0
        fires += active.sum(0).double()
        act_sum += torch.where(active, latents, 0.0).sum(0).double()
        l0_sum += active.sum().item()
        n_tokens += x.shape[0]
        if task is not None:
            labels = task.concept_labels(tokens)[keep]
            batch_scores = active_concept_precision_recall(active, labels, task.num_concepts)
            concepts = batch_scores if concepts is None else concepts + batch_scores
        bar.update(tokens.shape[0])
    bar.close()
    if n_tokens == 0:
        raise StoreError(f"The store at {store.path} has no tokens to evaluate after exclusions.")
    density = (fires / n_tokens).float()
    active_value = (act_sum / fires.clamp(min=1)).float()
    row: dict[str, Any] = {
        "method": method.name,
        "kind": method.kind,
        "hook_name": hook_name,
        "d_in": d_in,
        "d_sae": d_sae,
        "l0": l0_sum / n_tokens,
        "mse": sse / n_tokens,
        "explained_variance": explained_variance(sse, sum_x, sum_x2, n_tokens),
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
    row.update(dict.fromkeys((*SPLICE_COLUMNS, *CONCEPT_COLUMNS, *STEERING_COLUMNS), math.nan))
    tokens = torch.cat(all_tokens)
    if model is not None:
        if baseline is None:
            baseline = splice_baseline(model, tokens, hook_name, exclude, config.batch_sequences)
        row.update(
            splice_metrics(
                method, model, tokens, hook_name, exclude, baseline, config.batch_sequences
            )
        )
    if task is not None and concepts is not None:
        fields, details["per_concept"], best_latent = _concept_fields(
            concepts, task, config.precise_threshold
        )
        row.update(fields)
        if model is not None and task.has_steering:
            row.update(
                steering_metrics(
                    method, model, task, hook_name, best_latent, active_value, exclude, config
                )
            )
    for alias, name in ALIASES.items():
        row[alias] = row[name]
    return MethodEvaluation(row=row, details=details)


def _device_of(method: TrainedMethod) -> torch.device:
    for owner in (method.codebook, method.sae):
        if isinstance(owner, torch.nn.Module):
            for p in owner.parameters():
                return p.device
    return torch.device("cpu")


__all__ = [
    "ALIASES",
    "STEERING_POSITIONS",
    "EvalConfig",
    "MethodEvaluation",
    "SpliceBaseline",
    "evaluate_method",
    "evaluated_tokens",
    "explained_variance",
    "splice_baseline",
    "splice_hook",
    "splice_metrics",
    "steering_metrics",
    "steering_positions",
]
