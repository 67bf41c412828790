"""`TrainConfig`: every setting of a codebook training run, validated up front, saved as JSON.

One config serves both modes: `frozen` (only codebooks learn: reconstruction + optional KL to the
base model) and `joint` (the paper's method: the model is fine-tuned with its codebooks in place).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from typing import Any

from tl_codebook.configs import dataclass_from_dict
from tl_codebook.snap import check_similarity
from tl_codebook.training.sites import SiteSpec

MODES = ("frozen", "joint")
SCHEDULES = ("constant", "cosine", "linear")
CODEBOOK_INITS = ("random", "activations", "kmeans")

# Keys that may differ between a run and its resumption (they do not change what is computed).
RESUMABLE_DIFFERENCES = (
    "steps",
    "log_every",
    "checkpoint_every",
    "keep_checkpoints",
    "progress",
    "wandb_project",
    "out_dir",
)


def _choice(name: str, value: str, valid: tuple[str, ...]) -> None:
    if value not in valid:
        close = difflib.get_close_matches(str(value), valid, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"TrainConfig.{name}={value!r} is not one of {', '.join(valid)}.{hint}")


@dataclass
class TrainConfig:
    """Settings of one training run. Defaults follow the paper where it has one."""

    mode: str = "joint"
    sites: list[SiteSpec] = field(default_factory=list)
    layers: str = "all"
    """Layers for sites that do not name their own."""
    num_codes: int = 1000
    k: int = 1
    similarity: str = "inner_product"
    steps: int = 1000
    batch_size: int = 32
    seq_len: int | None = None
    """Tokens per sequence; None uses the batches as they come (must be <= the model's n_ctx)."""
    lr: float = 1e-3
    model_lr_factor: float = 1.0
    """Joint mode: the model's learning rate is lr * model_lr_factor."""
    codebook_weight_decay: float = 0.01
    model_weight_decay: float = 0.0
    warmup_steps: int = 0
    schedule: str = "constant"
    grad_clip: float | None = None
    mse_coef: float = 1.0
    """Frozen mode: weight of the reconstruction MSE (mean over tokens and dims) per codebook."""
    kl_coef: float = 0.0
    """Frozen mode: weight of KL(base model || codebook model) on next-token distributions."""
    codebook_init: str = "random"
    init_batches: int = 4
    """Batches of activations used by the 'activations' and 'kmeans' initialisations."""
    kmeans_iters: int = 25
    dead_code_every: int = 0
    """Replace codes unused over the last N steps by recent inputs plus noise; 0 = never."""
    dead_code_noise: float = 0.01
    checkpoint_every: int = 0
    keep_checkpoints: int = 2
    out_dir: str | None = None
    log_every: int = 10
    seed: int = 0
    bf16_autocast: bool = True
    """On CUDA, run forward passes under bf16 autocast (ignored on CPU)."""
    wandb_project: str | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        self.sites = [s if isinstance(s, SiteSpec) else SiteSpec.from_dict(s) for s in self.sites]
        _choice("mode", self.mode, MODES)
        _choice("schedule", self.schedule, SCHEDULES)
        _choice("codebook_init", self.codebook_init, CODEBOOK_INITS)
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
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"TrainConfig.grad_clip must be > 0 or None, got {self.grad_clip}.")
        if self.mode == "frozen" and not self.sites:
            raise ValueError("Frozen mode trains only codebooks: give at least one site.")

    def codebook_defaults(self) -> dict[str, Any]:
        return {"num_codes": self.num_codes, "k": self.k, "similarity": self.similarity}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        return dataclass_from_dict(cls, data)

    def differences(self, other: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
        """Keys whose values differ from a saved config dict (ignoring the resumable ones)."""
        mine = self.to_dict()
        keys = (set(mine) | set(other)) - set(RESUMABLE_DIFFERENCES)
        return {k: (other.get(k), mine.get(k)) for k in sorted(keys) if other.get(k) != mine.get(k)}
