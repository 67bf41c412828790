"""The TokFSM experiment end to end: train a base model, fine-tune it jointly with codebooks, find
each state's code, steer the model through those codes, and write everything to a run directory.

It is the project's main job (`tl-codebook demo`); every phase saves its results before the next
starts, so a run killed at any point leaves a readable report of what it finished.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Int
from safetensors.torch import save_file
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import HookedTransformerConfig

from tl_codebook.codebook import Codebook, CodebookConfig
from tl_codebook.fsm.dataset import TokFSMDataset
from tl_codebook.fsm.machine import FSM, FSMConfig
from tl_codebook.fsm.metrics import (
    first_transition_accuracy_exact,
    next_token_loss,
    sample_transition_accuracy,
)
from tl_codebook.fsm.steering import (
    evaluate_interventions,
    state_code_scores,
    summarize_state_codes,
)
from tl_codebook.hooks.model import HookedCodebookTransformer
from tl_codebook.training.kmeans import kmeans_grouped

CODEBOOK_SITES = ("attn.hook_z", "hook_mlp_out")
"""Per-layer sites a codebook can sit at; `attn.hook_z` gets one group per head."""
CODEBOOK_INITS = ("kmeans", "activations", "random")
SCHEDULES = ("cosine", "constant")
METRICS_FILE = "metrics.json"
REPORT_EVERY_S = 60.0
"""During training, metrics.json is rewritten every 100 steps, the report at most this often."""


def tokfsm_model_kwargs(
    shape: Any, vocab_size: int, device: str, positional_embedding_type: str = "rotary"
) -> dict[str, Any]:
    """HookedTransformerConfig arguments of a TokFSM model, from any config with the fields
    n_layers, d_model, n_heads, d_mlp, seq_len and seed (the demo's and the comparison's)."""
    return dict(
        n_layers=shape.n_layers,
        d_model=shape.d_model,
        n_heads=shape.n_heads,
        d_head=shape.d_model // shape.n_heads,
        d_mlp=shape.d_mlp,
        n_ctx=shape.seq_len,
        d_vocab=vocab_size,
        act_fn="gelu",
        normalization_type="LN",
        positional_embedding_type=positional_embedding_type,
        seed=shape.seed,
        device=device,
    )


@dataclass
class ExperimentConfig:
    """Everything that defines a TokFSM run (flat, so each field is one `--set key=value`).

    The defaults are the CPU setting of `tl-codebook demo` (a few minutes on 2 cores); `paper()`
    is the paper's setting and `toy()` a seconds-long smoke test. Why these CPU defaults
    (measured against the alternatives; about 5 minutes on 2 cores):

    - 4 layers, the paper's depth at half its width: states with a precise code were about
      0.72 with 2 layers, 0.75-0.81 with 3, 0.78-0.84 with 4; weight decay 0.1 on the model's
      weights raised it to 0.81-0.88 (0.3 lowers everything).
    - N=32, E=4, base 10 (2 digits per state), 32-token sequences: a rotary model must count to
      know which digit of a state it reads, and in a long sample one slip derails the rest
      (64 tokens: 0.95-0.98 transition accuracy after 1000 steps; 32 tokens: >= 0.99).
    - 128 codes per codebook (4 per state), k=1: 96 codes cost transition accuracy (0.96), 64
      much more (0.83). Codes start as k-means centres of the base model's activations (loss
      just after insertion 0.77 vs 1.22 for random activations; N(0, 1) does not recover).
    - Fine-tuning at 0.1x the codebooks' learning rate for the model's own weights
      (`model_lr_factor`; at 1x the loss rises during fine-tuning), cosine decay in both phases.
    """

    # the task
    n_states: int = 32
    n_edges: int = 4
    base: int = 10
    fsm_seed: int = 0
    seq_len: int = 32
    # the model
    n_layers: int = 4
    d_model: int = 64
    n_heads: int = 4
    d_mlp: int = 256
    positional_embedding_type: str = "rotary"
    # the codebooks
    codebook_sites: tuple[str, ...] = CODEBOOK_SITES
    num_codes: int = 128
    k: int = 1
    similarity: str = "inner_product"
    codebook_init: str = "kmeans"
    """"activations": each code starts as a random real activation of the base model at its site
    (right scale from the first step); "random": N(0, 1) as in the paper's from-scratch runs."""
    # training
    base_steps: int = 1200
    base_batch_size: int = 128
    base_lr: float = 3e-3
    codebook_steps: int = 500
    codebook_batch_size: int = 128
    codebook_lr: float = 1e-3
    codebook_weight_decay: float = 0.01
    weight_decay: float = 0.1
    """AdamW weight decay of the model's own weights (both phases)."""
    lr_schedule: str = "cosine"
    """"cosine" (decay to 10%; sharper models, fewer rare errors) or "constant" (the paper's)."""
    model_lr_factor: float = 0.1
    """The model's learning rate relative to the codebooks' during joint fine-tuning."""
    # evaluation
    n_samples: int = 200
    """Sampled continuations (temperature 1, from BOS + one state) for transition accuracy."""
    n_held_out: int = 512
    """Held-out sequences for the next-token loss and the state-code analysis."""
    precise_threshold: float = 0.9
    n_intervention_prompts: int = 400
    intervention_prompt_states: int = 3
    intervention_temperature: float = 1.0
    steering_min_precision: float = 0.0
    """A (site, group) takes part in steering when its best code for the target state has at
    least this precision (0: every codebook)."""
    # the run
    seed: int = 0
    threads: int = 2
    """torch CPU threads during the run (0: leave torch's setting; ignored on GPU)."""
    device: str = "auto"
    progress: bool = True

    def __post_init__(self) -> None:
        self.codebook_sites = tuple(self.codebook_sites)
        for site in self.codebook_sites:
            if site not in CODEBOOK_SITES:
                raise ValueError(
                    f"ExperimentConfig.codebook_sites: unknown site {site!r}; "
                    f"valid sites: {', '.join(CODEBOOK_SITES)}."
                )
        if self.lr_schedule not in SCHEDULES:
            raise ValueError(
                f"ExperimentConfig.lr_schedule must be one of {SCHEDULES}, got {self.lr_schedule!r}."
            )
        if self.codebook_init not in CODEBOOK_INITS:
            raise ValueError(
                f"ExperimentConfig.codebook_init must be one of {CODEBOOK_INITS}, "
                f"got {self.codebook_init!r}."
            )
        if self.d_model % self.n_heads:
            raise ValueError(
                f"ExperimentConfig.d_model={self.d_model} must be divisible by "
                f"n_heads={self.n_heads}."
            )
        for name in ("precise_threshold", "steering_min_precision"):
            value = getattr(self, name)
            if not 0 <= value <= 1:
                raise ValueError(f"ExperimentConfig.{name} must be in [0, 1], got {value!r}.")
        positive = (
            "seq_len n_layers d_model n_heads d_mlp num_codes k base_steps base_batch_size "
            "codebook_steps codebook_batch_size n_samples n_held_out n_intervention_prompts "
            "intervention_prompt_states"
        ).split()
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ExperimentConfig.{name} must be an integer >= 1, got {value!r}.")
        if self.k > self.num_codes:
            raise ValueError(
                f"ExperimentConfig.k={self.k} must be at most num_codes={self.num_codes}."
            )
        self.fsm_config()  # validates n_states, n_edges, base

    # -- presets -----------------------------------------------------------------------------

    @classmethod
    def toy(cls) -> ExperimentConfig:
        """Seconds on a CPU: for tests; the numbers it produces mean little."""
        return cls(
            n_states=6,
            n_edges=2,
            base=3,
            seq_len=16,
            n_layers=1,
            d_model=16,
            n_heads=2,
            d_mlp=32,
            num_codes=12,
            base_steps=20,
            base_batch_size=16,
            codebook_steps=10,
            codebook_batch_size=16,
            n_samples=16,
            n_held_out=32,
            n_intervention_prompts=24,
            threads=1,
        )

    @classmethod
    def paper(cls) -> ExperimentConfig:
        """The paper's TokFSM setting (for a GPU): N=100, E=10, base 10, 4 layers, 1000 codes."""
        return cls(
            n_states=100,
            n_edges=10,
            base=10,
            seq_len=128,
            n_layers=4,
            d_model=128,
            n_heads=4,
            d_mlp=512,
            num_codes=1000,
            k=1,
            base_steps=20_000,
            base_batch_size=512,
            base_lr=1e-3,
            codebook_steps=20_000,
            codebook_batch_size=512,
            codebook_lr=1e-3,
            lr_schedule="constant",
            model_lr_factor=1.0,
            weight_decay=0.0,
            n_samples=200,
            n_held_out=1024,
            n_intervention_prompts=2000,
        )

    # -- derived -----------------------------------------------------------------------------

    def fsm_config(self) -> FSMConfig:
        return FSMConfig(
            n_states=self.n_states, n_edges=self.n_edges, base=self.base, seed=self.fsm_seed
        )

    def model_config(self, vocab_size: int, device: str) -> HookedTransformerConfig:
        return HookedTransformerConfig(
            **tokfsm_model_kwargs(self, vocab_size, device, self.positional_embedding_type)
        )

    def hook_names(self) -> list[str]:
        """Every codebook site's full hook name, layer by layer."""
        return [
            f"blocks.{layer}.{site}"
            for layer in range(self.n_layers)
            for site in self.codebook_sites
        ]

    # -- persistence -------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["codebook_sites"] = list(self.codebook_sites)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ExperimentConfig:
        """Build a config from a (possibly partial) dict; unknown keys are refused with hints."""
        fields = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(fields))
        if unknown:
            hints = {u: difflib.get_close_matches(u, fields, n=1) for u in unknown}
            detail = ", ".join(
                f"{u!r}" + (f" (did you mean {h[0]!r}?)" if h else "") for u, h in hints.items()
            )
            raise ValueError(
                f"Unknown ExperimentConfig key(s): {detail}. Valid keys: {', '.join(fields)}."
            )
        data = dict(data)
        if "codebook_sites" in data:
            data["codebook_sites"] = tuple(data["codebook_sites"])
        for f in dataclasses.fields(cls):  # an int where a float goes (`--set base_lr=1`)
            value = data.get(f.name)
            if (
                isinstance(f.default, float)
                and isinstance(value, int)
                and not isinstance(value, bool)
            ):
                data[f.name] = float(value)
        return cls(**data)

    def replace(self, **changes: Any) -> ExperimentConfig:
        return ExperimentConfig.from_dict({**self.to_dict(), **changes})


PRESETS: dict[str, Callable[[], ExperimentConfig]] = {
    "cpu": ExperimentConfig,
    "paper": ExperimentConfig.paper,
    "toy": ExperimentConfig.toy,
}


# -- training ----------------------------------------------------------------------------------


@dataclass
class TrainHistory:
    """Loss after every step, and how long the loop took."""

    loss: list[float]
    seconds: float


def lr_factor(step: int, steps: int, schedule: str) -> float:
    """Learning-rate multiplier: linear warm-up over min(100, steps/10) steps, then constant or
    a cosine decay to 10% at the last step."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}.")
    warmup = max(1, min(100, steps // 10))
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _train_lm(
    model: HookedCodebookTransformer,
    batches: Iterator[Tensor],
    steps: int,
    lr: float,
    codebook_weight_decay: float = 0.01,
    weight_decay: float = 0.0,
    model_lr_factor: float = 1.0,
    schedule: str = "cosine",
    desc: str = "train",
    progress: bool = True,
    on_log: Callable[[TrainHistory], None] | None = None,
    log_every: int = 100,
) -> TrainHistory:
    """Next-token training of every parameter (AdamW; warm-up, then `schedule`, see `lr_factor`).

    With codebooks in place this is the paper's joint training: the codebooks' reconstruction
    gradient is part of their backward, so the loss here is the plain LM loss.
    """
    device = next(model.parameters()).device
    codes = [cb.codes for cb in model.codebooks.values()]
    code_ids = {id(p) for p in codes}
    groups = [
        {
            "params": [p for p in model.parameters() if id(p) not in code_ids],
            "lr": lr * model_lr_factor,
            "weight_decay": weight_decay,
        }
    ]
    if codes:
        groups.append({"params": codes, "weight_decay": codebook_weight_decay})
    optimizer = torch.optim.AdamW(groups, lr=lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, steps, schedule)
    )
    history = TrainHistory(loss=[], seconds=0.0)
    started = time.perf_counter()
    model.train()
    bar = tqdm(range(steps), desc=desc, disable=not progress, dynamic_ncols=True)
    for step in bar:
        tokens = next(batches).to(device)
        loss = model(tokens, return_type="loss")
        if not torch.isfinite(loss):
            raise RuntimeError(f"{desc}: the loss became {loss.item()} at step {step}.")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        history.loss.append(loss.item())
        if step % 10 == 0:
            bar.set_postfix(loss=f"{history.loss[-1]:.4f}")
        history.seconds = time.perf_counter() - started
        if on_log is not None and (step + 1) % log_every == 0:
            on_log(history)
    model.eval()
    return history


# -- building the models -----------------------------------------------------------------------


def build_base_model(config: ExperimentConfig, fsm: FSM, device: str) -> HookedCodebookTransformer:
    torch.manual_seed(config.seed)
    return HookedCodebookTransformer(config.model_config(fsm.vocab_size, device))


@torch.no_grad()
def build_codebook_model(
    config: ExperimentConfig,
    base: HookedCodebookTransformer,
    init_tokens: Int[Tensor, "batch pos"],
) -> HookedCodebookTransformer:
    """A copy of `base` with a codebook at every site (the base model itself is left untouched).

    With `codebook_init="activations"` each code starts as a random activation of the base
    model at its site on `init_tokens`: the right scale from the first step.
    """
    model = HookedCodebookTransformer(base.cfg)
    model.load_state_dict(base.state_dict())
    names = config.hook_names()
    _, cache = base.run_with_cache(init_tokens.to(base.cfg.device), names_filter=names)
    generator = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)
    for name in names:
        act = cache[name]
        grouped = name.endswith("attn.hook_z")
        d_in = act.shape[-1] * (act.shape[-2] if grouped else 1)
        cb = Codebook(
            CodebookConfig(
                d_in=d_in,
                num_codes=config.num_codes,
                k=config.k,
                similarity=config.similarity,
                n_groups=config.n_heads if grouped else 1,
                hook_name=name,
            )
        )
        rows = act[:, 1:].reshape(-1, cb.cfg.n_groups, cb.cfg.d_group)  # BOS is an outlier
        if config.codebook_init == "activations":
            cb.init_from_activations(rows.cpu(), generator=generator)
        elif config.codebook_init == "kmeans":
            cb.codes.copy_(kmeans_grouped(rows, config.num_codes, seed=config.seed))
        model.add_codebook(cb.to(base.cfg.device))
    return model


# -- the pipeline ------------------------------------------------------------------------------


def _resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def _json_ready(value: Any) -> Any:
    """Floats rounded and non-finite floats as None, so metrics.json is strict JSON."""
    if isinstance(value, float):
        return round(value, 6) if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    return value


def write_metrics(out_dir: Path, metrics: dict[str, Any]) -> None:
    """Write metrics.json atomically (a killed run never leaves a half-written file)."""
    path = out_dir / METRICS_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(_json_ready(metrics), indent=2))
    tmp.replace(path)


def evaluate_lm(
    model: HookedCodebookTransformer,
    fsm: FSM,
    held_out: Int[Tensor, "batch pos"],
    config: ExperimentConfig,
) -> dict[str, float]:
    """Transition accuracy of sampled continuations, the exact first-transition accuracy and the
    held-out next-token loss."""
    sampled = sample_transition_accuracy(
        model,
        fsm,
        n_samples=config.n_samples,
        prompt_states=1,
        seq_len=config.seq_len,
        temperature=1.0,
        seed=config.seed + 1,
    )
    return {
        "transition_accuracy": sampled.accuracy,
        "first_transition_accuracy": sampled.first_transition_accuracy,
        "first_transition_accuracy_exact": first_transition_accuracy_exact(model, fsm),
        "next_token_loss": next_token_loss(model, held_out),
        "n_transitions": sampled.n_transitions,
    }


def loss_floor(fsm: FSM, seq_len: int) -> float:
    """The task's entropy per predicted token of a `seq_len`-token walk: the best possible loss.

    The first state costs log N, each later one log E; a trailing partial state costs the entropy
    of its digits over a random successor (averaged over states with equal weight: approximate).
    """
    d, n_digits = fsm.digits_per_state, seq_len - 1
    n_complete, partial = divmod(n_digits, d)
    if n_complete == 0:
        return math.log(fsm.n_states) / d
    total = math.log(fsm.n_states) + (n_complete - 1) * math.log(fsm.n_edges)
    if partial:
        successors = fsm.trajectory_to_tokens(fsm.transitions, add_bos=False)
        successors = successors.view(fsm.n_states, fsm.n_edges, d)[..., :partial]
        entropy = 0.0
        for prefixes in successors:
            _, counts = prefixes.unique(dim=0, return_counts=True)
            p = counts.double() / fsm.n_edges
            entropy -= float((p * p.log()).sum())
        total += entropy / fsm.n_states
    return total / n_digits


def run_experiment(
    config: ExperimentConfig,
    out_dir: str | Path,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run every phase, writing `metrics.json`, weights and the report into `out_dir` as it goes.

    Returns the final metrics (the content of metrics.json). On the CPU, torch uses
    `config.threads` threads during the run (the previous setting is restored after it).
    """
    device = _resolve_device(config.device)
    previous_threads = torch.get_num_threads()
    if device == "cpu" and config.threads > 0:
        torch.set_num_threads(config.threads)
    try:
        return _run_phases(config, Path(out_dir), device, log)
    except KeyboardInterrupt:
        _mark_stopped(Path(out_dir), "interrupted")
        raise
    except Exception as err:
        _mark_stopped(Path(out_dir), f"failed: {type(err).__name__}: {err}")
        raise
    finally:
        torch.set_num_threads(previous_threads)


def _mark_stopped(out: Path, why: str) -> None:
    """Record in metrics.json (and the report) that the run stopped early, and why."""
    from tl_codebook.fsm.report import write_report

    path = out / METRICS_FILE
    if not path.is_file():
        return
    metrics = json.loads(path.read_text())
    metrics["status"] = why
    write_metrics(out, metrics)
    write_report(out)


def _run_phases(
    config: ExperimentConfig, out: Path, device: str, log: Callable[[str], None]
) -> dict[str, Any]:
    from tl_codebook.fsm.report import write_report

    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    fsm = FSM.generate(config.fsm_config())
    fsm.save(out / "fsm.json")
    dataset = TokFSMDataset(fsm, seq_len=config.seq_len, seed=config.seed)
    held_out = dataset.held_out(config.n_held_out, seed=config.seed)
    metrics: dict[str, Any] = {
        "config": config.to_dict(),
        "status": "running",
        "phases": {},
        "digits_per_state": fsm.digits_per_state,
        "loss_floor": loss_floor(fsm, config.seq_len),
    }

    last_report = [0.0]

    def save(status: str | None = None, report: bool = True) -> None:
        """metrics.json always; the report too unless `report=False` (it takes a second)."""
        if status is not None:
            metrics["status"] = status
        metrics["seconds"] = time.perf_counter() - started
        write_metrics(out, metrics)
        if report:
            write_report(out)
            last_report[0] = time.perf_counter()

    save()
    log(
        f"TokFSM: N={config.n_states} states, E={config.n_edges} edges, base {config.base} "
        f"({fsm.digits_per_state} digits/state), seq_len {config.seq_len}; model: "
        f"{config.n_layers} layers, d_model {config.d_model}, {config.n_heads} heads, d_mlp "
        f"{config.d_mlp}, {config.positional_embedding_type}; codebooks: {config.num_codes} codes, "
        f"k={config.k} at {', '.join(config.codebook_sites)} of every layer; steps: base "
        f"{config.base_steps} x {config.base_batch_size}, codebook {config.codebook_steps} x "
        f"{config.codebook_batch_size}; device {device}; writing to {out}"
    )

    # 1. the base model
    base = build_base_model(config, fsm, device)
    metrics["training"] = {}

    def record_training(name: str) -> Callable[[TrainHistory], None]:
        def on_log(history: TrainHistory) -> None:
            metrics["training"][name] = {"loss": history.loss, "seconds": history.seconds}
            save(report=time.perf_counter() - last_report[0] > REPORT_EVERY_S)

        return on_log

    history = _train_lm(
        base,
        dataset.batches(config.base_batch_size),
        config.base_steps,
        config.base_lr,
        weight_decay=config.weight_decay,
        schedule=config.lr_schedule,
        desc="1/4 base model",
        progress=config.progress,
        on_log=record_training("base"),
    )
    record_training("base")(history)
    (out / "base_model").mkdir(exist_ok=True)
    save_file(
        {k: v.detach().cpu().contiguous() for k, v in base.state_dict().items()},
        str(out / "base_model" / "model.safetensors"),
    )
    phase = time.perf_counter()
    base_eval = evaluate_lm(base, fsm, held_out, config)
    metrics["base"] = base_eval
    metrics["base_transition_accuracy"] = base_eval["transition_accuracy"]
    metrics["phases"]["base"] = history.seconds + time.perf_counter() - phase
    save()
    log(_describe("1/4 base model", base_eval, metrics["phases"]["base"]))

    # 2. the codebook model: joint fine-tuning from the base model
    init_tokens = next(dataset.batches(max(config.codebook_batch_size, 64)))
    model = build_codebook_model(config, base, init_tokens)
    loss_before = next_token_loss(model, held_out)
    history = _train_lm(
        model,
        TokFSMDataset(fsm, seq_len=config.seq_len, seed=config.seed + 1).batches(
            config.codebook_batch_size
        ),
        config.codebook_steps,
        config.codebook_lr,
        codebook_weight_decay=config.codebook_weight_decay,
        weight_decay=config.weight_decay,
        model_lr_factor=config.model_lr_factor,
        schedule=config.lr_schedule,
        desc="2/4 codebook model",
        progress=config.progress,
        on_log=record_training("codebook"),
    )
    record_training("codebook")(history)
    model.fine_tuned = True
    model.save_codebooks(out / "codebook_model", save_model_weights=True)
    phase = time.perf_counter()
    cb_eval = evaluate_lm(model, fsm, held_out, config)
    cb_eval["next_token_loss_before_fine_tuning"] = loss_before
    for cb in model.codebooks.values():
        cb.reset_stats()
    with torch.no_grad():
        model(held_out[:64].to(device))
    cb_eval["dead_code_fraction"] = sum(cb.dead_fraction for cb in model.codebooks.values()) / len(
        model.codebooks
    )
    metrics["codebook"] = cb_eval
    metrics["codebook_transition_accuracy"] = cb_eval["transition_accuracy"]
    metrics["phases"]["codebook"] = history.seconds + time.perf_counter() - phase
    save()
    log(_describe("2/4 codebook model", cb_eval, metrics["phases"]["codebook"]))

    # 3. state codes
    phase = time.perf_counter()
    phase_scores = state_code_scores(model, fsm, held_out)
    summary = summarize_state_codes(phase_scores[0], fsm.n_states, config.precise_threshold)
    metrics["state_codes"] = summary
    metrics["states_with_precise_code"] = summary["states_with_precise_code"]
    metrics["phases"]["state_codes"] = time.perf_counter() - phase
    save()
    log(
        f"3/4 state codes: {summary['states_with_precise_code']:.1%} of states have a code with "
        f"precision and recall >= {config.precise_threshold} "
        f"({metrics['phases']['state_codes']:.0f}s)"
    )

    # 4. interventions
    phase = time.perf_counter()
    interventions = evaluate_interventions(
        model,
        fsm,
        phase_scores,
        n_prompts=config.n_intervention_prompts,
        prompt_states=config.intervention_prompt_states,
        temperature=config.intervention_temperature,
        min_precision=config.steering_min_precision,
        seed=config.seed + 2,
        progress=config.progress,
    )
    metrics["interventions"] = interventions
    metrics["intervention_success"] = interventions["steer"]["success"]
    metrics["intervention_success_random_code"] = interventions["random_code"]["success"]
    metrics["intervention_success_no_intervention"] = interventions["none"]["success"]
    metrics["phases"]["interventions"] = time.perf_counter() - phase
    save("done")
    log(
        f"4/4 interventions: success {metrics['intervention_success']:.1%} (random code "
        f"{metrics['intervention_success_random_code']:.1%}, none "
        f"{metrics['intervention_success_no_intervention']:.1%}) "
        f"({metrics['phases']['interventions']:.0f}s)"
    )
    log(f"done in {metrics['seconds']:.0f}s; report: {out / 'index.html'}")
    return metrics


def _describe(name: str, results: dict[str, float], seconds: float) -> str:
    return (
        f"{name}: transition accuracy {results['transition_accuracy']:.1%}, exact first-transition "
        f"accuracy {results['first_transition_accuracy_exact']:.1%}, held-out loss "
        f"{results['next_token_loss']:.4f} ({seconds:.0f}s)"
    )
