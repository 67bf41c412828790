"""The two models of a TokFSM run and how they are trained: the base model (plain next-token
training) and its copy with codebooks, fine-tuned jointly (the paper's method).

Both go through the project's one trainer, `train_codebooks`: this module only turns an
`ExperimentConfig` into the trainer's `TrainConfig`s, so the demo, the comparison and
`tl-codebook train` share one loop, one learning-rate schedule and one codebook init. Both
phases train in float32 on every device (no bf16 autocast on CUDA): the models are small, and a
GPU run trains in the precision the CPU run does.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from torch import Tensor

from tl_codebook.files import atomic_write_bytes
from tl_codebook.fsm.config import ExperimentConfig
from tl_codebook.fsm.machine import FSM
from tl_codebook.hooks.model import HookedCodebookTransformer
from tl_codebook.training import TrainConfig, train_codebooks
from tl_codebook.training.sites import SiteSpec
from tl_codebook.training.trainer import TrainResult

FSM_FILE = "fsm.json"
BASE_MODEL_WEIGHTS = "base_model/model.safetensors"
CODEBOOK_MODEL_DIR = "codebook_model"
TRAINING_DIR = "training"
"""`training/base` and `training/codebook` hold each phase's checkpoints and `metrics.jsonl`."""
INIT_ROWS = 64
"""Sequences of base-model activations the k-means / activations init reads (at least)."""
INIT_POSITIONS_PER_CODE = 16
"""...and at least this many token positions per code: with 1024 codes, 64 sequences give
k-means about 2 points per centre, and the near-duplicate centres it then returns die."""


def init_batches(config: ExperimentConfig) -> int:
    """Batches the codebook init reads: enough for `INIT_ROWS` sequences and for
    `INIT_POSITIONS_PER_CODE` positions per code (BOS excluded)."""
    per_code = -(-INIT_POSITIONS_PER_CODE * config.num_codes // (config.seq_len - 1))
    return -(-max(INIT_ROWS, per_code) // config.codebook_batch_size)


def warmup_steps(steps: int) -> int:
    """The demo's linear warm-up: min(100, steps / 10) steps, at least 1 (as it always had)."""
    return max(1, min(100, steps // 10))


def phase_dir(out: Path, phase: str) -> Path:
    """Where phase `phase` ("base" or "codebook") keeps its checkpoints and training log."""
    return out / TRAINING_DIR / phase


def codebook_site_specs(config: ExperimentConfig) -> list[SiteSpec]:
    """One site spec per codebook, layer by layer (`attn.hook_z` with one group per head)."""
    return [SiteSpec(at=name, group=name.endswith("attn.hook_z")) for name in config.hook_names()]


def base_train_config(config: ExperimentConfig, out_dir: Path | None) -> TrainConfig:
    """Plain next-token training of every weight (joint mode without codebook sites)."""
    return TrainConfig(
        mode="joint",
        sites=[],
        steps=config.base_steps,
        batch_size=config.base_batch_size,
        lr=config.base_lr,
        model_weight_decay=config.weight_decay,
        warmup_steps=warmup_steps(config.base_steps),
        schedule=config.lr_schedule,
        min_lr_fraction=config.min_lr_fraction,
        checkpoint_every=config.checkpoint_every if out_dir is not None else 0,
        out_dir=None if out_dir is None else str(out_dir),
        log_every=max(1, config.base_steps // 500),
        seed=config.seed,
        bf16_autocast=False,
        progress=config.progress,
    )


def codebook_train_config(config: ExperimentConfig, fsm: FSM, out_dir: Path | None) -> TrainConfig:
    """Joint fine-tuning with a codebook at every site: the codebooks at `codebook_lr`, the
    model's own weights at `model_lr_factor` times that; codes start from the base model's
    activations (`codebook_init`), BOS positions excluded."""
    return TrainConfig(
        mode="joint",
        sites=list(codebook_site_specs(config)),
        num_codes=config.num_codes,
        k=config.k,
        similarity=config.similarity,
        steps=config.codebook_steps,
        batch_size=config.codebook_batch_size,
        lr=config.codebook_lr,
        model_lr_factor=config.model_lr_factor,
        codebook_weight_decay=config.codebook_weight_decay,
        model_weight_decay=config.weight_decay,
        warmup_steps=warmup_steps(config.codebook_steps),
        schedule=config.lr_schedule,
        min_lr_fraction=config.min_lr_fraction,
        codebook_init=config.codebook_init,
        init_batches=init_batches(config),
        dead_code_every=config.dead_code_every,
        exclude_token_ids=[fsm.bos_token],
        checkpoint_every=config.checkpoint_every if out_dir is not None else 0,
        out_dir=None if out_dir is None else str(out_dir),
        log_every=max(1, config.codebook_steps // 500),
        seed=config.seed,
        bf16_autocast=False,
        progress=config.progress,
    )


def build_base_model(config: ExperimentConfig, fsm: FSM, device: str) -> HookedCodebookTransformer:
    """A freshly initialised TokFSM model (its weights drawn from `config.seed`)."""
    torch.manual_seed(config.seed)
    return HookedCodebookTransformer(config.model_config(fsm.vocab_size, device))


def train_base_model(
    config: ExperimentConfig,
    model: HookedCodebookTransformer,
    batches: Iterable[Tensor],
    out_dir: Path | None = None,
    resume: bool = False,
) -> TrainResult:
    """Train `model` in place on next-token prediction; checkpoints go to `out_dir` (resumed
    from there with `resume=True`)."""
    return train_codebooks(model, batches, base_train_config(config, out_dir), resume=resume)


def copy_model(base: HookedCodebookTransformer) -> HookedCodebookTransformer:
    """A new model with `base`'s weights (and none of its codebooks); `base` is left untouched."""
    model = HookedCodebookTransformer(base.cfg)
    model.load_state_dict(base.state_dict())
    return model


def starting_model(
    config: ExperimentConfig, base: HookedCodebookTransformer, fsm: FSM
) -> HookedCodebookTransformer:
    """The model phase 2 inserts its codebooks into: a copy of `base` (route "fine-tune", ours)
    or a freshly initialised model with the base model's initial weights (route "scratch", the
    reference's: the codebook model is trained from scratch with its codebooks in place)."""
    if config.codebook_route == "scratch":
        return build_base_model(config, fsm, str(next(base.parameters()).device))
    return copy_model(base)


def train_codebook_model(
    config: ExperimentConfig,
    base: HookedCodebookTransformer,
    batches: Iterable[Tensor],
    fsm: FSM,
    out_dir: Path | None = None,
    resume: bool = False,
) -> tuple[HookedCodebookTransformer, TrainResult]:
    """`starting_model` with a codebook at every site, trained jointly on `batches` (the first
    batches also serve the codebook init); returns the model and the trainer's result."""
    model = starting_model(config, base, fsm)
    result = train_codebooks(
        model, batches, codebook_train_config(config, fsm, out_dir), resume=resume
    )
    model.fine_tuned = True
    return model, result


def save_base_model(model: HookedCodebookTransformer, out: Path) -> None:
    """Write the base model's weights to `out/base_model/model.safetensors`, atomically."""
    weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write_bytes(out / BASE_MODEL_WEIGHTS, safetensors_bytes(weights))


def load_base_model(
    config: ExperimentConfig, fsm: FSM, out: Path, device: str
) -> HookedCodebookTransformer:
    """The base model a finished base phase saved in `out`."""
    model = build_base_model(config, fsm, device)
    model.load_state_dict(load_file(str(out / BASE_MODEL_WEIGHTS), device=str(device)))
    model.eval()
    return model


def load_codebook_model(base: HookedCodebookTransformer, out: Path) -> HookedCodebookTransformer:
    """The fine-tuned codebook model a finished codebook phase saved in `out`."""
    model = copy_model(base)
    model.load_codebooks(out / CODEBOOK_MODEL_DIR)
    model.eval()
    return model


def load_run(
    out_dir: str | Path, device: str = "cpu"
) -> tuple[FSM, HookedCodebookTransformer, HookedCodebookTransformer]:
    """The FSM, the base model and the fine-tuned codebook model of a `tl-codebook demo` run
    whose two training phases have finished (e.g. to analyse or steer them further).

    Args:
        out_dir: the run directory (`tl-codebook demo --out`).
        device: where the models go.

    Returns:
        `(fsm, base_model, codebook_model)`, both models in eval mode.

    Raises:
        ValueError: if `out_dir` holds no metrics.json (no run), an unreadable one, or a
            config that no longer validates; CodebookFileError (a ValueError) for missing or
            corrupted codebook files.
        FileNotFoundError: if a phase has not finished (its weights or the FSM file missing).
    """
    from tl_codebook.fsm.metrics_file import read_metrics

    out = Path(out_dir)
    config = ExperimentConfig.from_dict(read_metrics(out).get("config", {}))
    fsm = FSM.load(out / FSM_FILE)
    base = load_base_model(config, fsm, out, device)
    return fsm, base, load_codebook_model(base, out)
