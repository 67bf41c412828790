"""`TrainConfig`: every setting of a codebook training run, validated up front, saved as JSON.

One config serves both modes: `frozen` (only codebooks learn: reconstruction + optional KL to the
base model) and `joint` (the paper's method: the model is fine-tuned with its codebooks in place).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from tl_codebook.configs import check_choice, dataclass_from_dict
from tl_codebook.snap import check_similarity
from tl_codebook.training.sites import SiteSpec

MODES = ("frozen", "joint")
SCHEDULES = ("constant", "cosine", "linear")
CODEBOOK_INITS = ("random", "activations", "kmeans")
"""How codebooks start (see `tl_codebook.training.codebook_init.initialise_codebook`): "random"
Gaussian codes, "activations" (distinct random real inputs) or "kmeans" (k-means centres)."""
MSE_REDUCTIONS = ("mean", "sum_over_dims")

# Keys that may differ between a run and its resumption (they do not change what is computed).
# `steps` is checked apart: it may differ only under the constant schedule (cosine and linear
# decay over `steps`), and never below the checkpoint's step.
RESUMABLE_DIFFERENCES = (
    "steps",
    "log_every",
    "checkpoint_every",
    "keep_checkpoints",
    "progress",
    "wandb_project",
    "out_dir",
)


@dataclass
class TrainConfig:
    """Settings of one training run. Defaults follow the paper where it has one.

    Every value is checked on construction, so a bad setting fails before any work starts.

    Raises:
        ValueError: for an unknown `mode`, `schedule`, `codebook_init`, `mse_reduction` or
            `similarity` (naming the valid ones), a count that is not a positive integer (a
            non-negative one for `warmup_steps`, `dead_code_every`, `checkpoint_every`), a
            negative or non-finite rate or coefficient, `min_lr_fraction` outside [0, 1],
            `grad_clip <= 0`, bad `exclude_token_ids`, or a site spec that cannot be read.
    """

    mode: str = "joint"
    """"frozen": only the codebooks learn (reconstruction, plus optional KL to the base model);
    "joint": the model is fine-tuned with its codebooks in place on next-token loss (the paper)."""
    sites: list[SiteSpec | str | dict[str, Any]] = field(default_factory=list)
    """Where codebooks go: `SiteSpec`s, the CLI's spec strings ("attn.hook_z:group:k=2") or
    their JSON dicts; all become `SiteSpec`s on construction."""
    layers: str = "all"
    """Layers for sites that do not name their own."""
    num_codes: int = 1000
    """Codes per codebook group, for sites that do not set their own."""
    k: int = 1
    """Codes active per token and group, for sites that do not set their own."""
    similarity: str = "inner_product"
    """"inner_product", "cosine" or "euclidean", for sites that do not set their own."""
    steps: int = 1000
    """Optimizer steps of the whole run (one batch each)."""
    batch_size: int = 32
    """Sequences (activation rows, on activations) per step, over all ranks."""
    seq_len: int | None = None
    """Tokens per sequence; None uses the batches as they come (must be <= the model's n_ctx)."""
    lr: float = 1e-3
    """Peak learning rate of the codebooks (AdamW), scaled by `lr_factor` at each step."""
    model_lr_factor: float = 1.0
    """Joint mode: the model's learning rate is lr * model_lr_factor."""
    codebook_weight_decay: float = 0.01
    """AdamW weight decay of the codes."""
    model_weight_decay: float = 0.0
    """Joint mode: AdamW weight decay of the model's weights."""
    warmup_steps: int = 0
    """Steps of linear learning-rate warm-up (0: none)."""
    schedule: str = "constant"
    """After warm-up: "constant", or a "cosine" or "linear" decay to `min_lr_fraction`."""
    min_lr_fraction: float = 0.0
    """Cosine and linear decay end at this fraction of the base learning rate (see `lr_factor`)."""
    grad_clip: float | None = None
    """Clip the global gradient norm to this value; None: no clipping."""
    mse_coef: float = 1.0
    """Frozen mode: weight of each codebook's reconstruction MSE (see `mse_reduction`)."""
    mse_reduction: str = "mean"
    """Frozen mode: "mean" over tokens and dimensions, or "sum_over_dims" (summed over the
    dimensions, averaged over tokens: SAELens' MSE loss, whose scale `grad_clip` then sees)."""
    kl_coef: float = 0.0
    """Frozen mode: weight of KL(base model || codebook model) on next-token distributions."""
    codebook_init: str = "random"
    """"random": codebooks the trainer creates start as Gaussian codes drawn from `seed` (codebooks
    already in place keep theirs); "activations" (distinct random inputs) and "kmeans" (k-means
    centres of the inputs) set every trained codebook from the first `init_batches` batches."""
    init_batches: int = 4
    """Batches of activations used by the 'activations' and 'kmeans' initialisations."""
    exclude_token_ids: list[int] | None = None
    """Positions holding these tokens are never samples for the 'activations'/'kmeans' init or
    dead-code replacement (a BOS activation is an outlier). None: the model tokenizer's BOS id
    when it has one, else nothing; [] excludes nothing. Activations given directly
    (`train_codebooks_on_activations`) carry no tokens: exclude those rows before."""
    kmeans_iters: int = 25
    """Lloyd iterations of the "kmeans" initialisation."""
    dead_code_every: int = 0
    """Replace codes unused over the last N steps by recent inputs plus noise; 0 = never."""
    dead_code_noise: float = 0.01
    """Std of the noise added to the inputs that replace dead codes."""
    checkpoint_every: int = 0
    """Write a resumable checkpoint into `out_dir` every N steps (0: never)."""
    keep_checkpoints: int = 2
    """How many of the most recent checkpoints to keep."""
    out_dir: str | None = None
    """The run directory (checkpoints, metrics.jsonl); None writes nothing."""
    log_every: int = 10
    """Record metrics (history, metrics.jsonl, W&B) every N steps."""
    seed: int = 0
    """Seeds the initialisation, dead-code replacement and torch's global RNG for the run."""
    bf16_autocast: bool = True
    """On CUDA, run forward passes under bf16 autocast (ignored on CPU)."""
    wandb_project: str | None = None
    """Log metrics to this Weights & Biases project (needs `wandb` installed); None: off."""
    progress: bool = True
    """Show a progress bar."""

    def __post_init__(self) -> None:
        self.sites = [s if isinstance(s, SiteSpec) else SiteSpec.from_dict(s) for s in self.sites]
        check_choice("TrainConfig.mode", self.mode, MODES)
        check_choice("TrainConfig.schedule", self.schedule, SCHEDULES)
        check_choice("TrainConfig.codebook_init", self.codebook_init, CODEBOOK_INITS)
        check_choice("TrainConfig.mse_reduction", self.mse_reduction, MSE_REDUCTIONS)
        check_similarity(self.similarity)
        for name in (
            "num_codes",
            "k",
            "steps",
            "batch_size",
            "log_every",
            "keep_checkpoints",
            "init_batches",
            "kmeans_iters",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"TrainConfig.{name} must be an integer >= 1, got {value!r}.")
        for name in ("warmup_steps", "dead_code_every", "checkpoint_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"TrainConfig.{name} must be an integer >= 0, got {value!r}.")
        for name in (
            "lr",
            "model_lr_factor",
            "codebook_weight_decay",
            "model_weight_decay",
            "mse_coef",
            "kl_coef",
            "dead_code_noise",
        ):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"TrainConfig.{name} must be finite and >= 0, got {value!r}.")
        if self.seq_len is not None and self.seq_len < 1:
            raise ValueError(f"TrainConfig.seq_len must be >= 1 or None, got {self.seq_len}.")
        if not 0.0 <= self.min_lr_fraction <= 1.0:
            raise ValueError(
                f"TrainConfig.min_lr_fraction must be between 0 and 1, got {self.min_lr_fraction!r}."
            )
        if self.exclude_token_ids is not None:
            ids = self.exclude_token_ids
            if not isinstance(ids, (list, tuple)) or any(
                isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in ids
            ):
                raise ValueError(
                    f"TrainConfig.exclude_token_ids must be a list of token ids (integers >= 0) "
                    f"or None, got {ids!r}."
                )
            self.exclude_token_ids = list(ids)
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"TrainConfig.grad_clip must be > 0 or None, got {self.grad_clip}.")

    def codebook_defaults(self) -> dict[str, Any]:
        """The codebook settings sites inherit unless they set their own: num_codes, k,
        similarity (the `defaults` of `resolve_sites`)."""
        return {"num_codes": self.num_codes, "k": self.k, "similarity": self.similarity}

    def to_dict(self) -> dict[str, Any]:
        """The config as a JSON-ready dict (sites as their dicts), as checkpoints save it."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """The config a dict from `to_dict` describes.

        Raises:
            ValueError: for an unknown key (with the closest valid one), a value of the wrong
                type, or any check of the config.
        """
        return dataclass_from_dict(cls, data)

    def differences(self, other: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
        """Keys whose values differ from a saved config dict (ignoring the resumable ones)."""
        mine = self.to_dict()
        keys = (set(mine) | set(other)) - set(RESUMABLE_DIFFERENCES)
        return {k: (other.get(k), mine.get(k)) for k in sorted(keys) if other.get(k) != mine.get(k)}
