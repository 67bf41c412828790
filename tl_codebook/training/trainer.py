"""The training loop: codebooks alone (on a frozen model, or on cached activations), or jointly
with the model (the paper's method), resumable from atomic checkpoints and data-parallel under
torchrun.

Reads top to bottom: `train_codebooks` (token batches through a model) and
`train_codebooks_on_activations` (activation batches, no model) build one `Trainer`, which places
the codebooks, checks every input, initialises, then loops `step()`. The two differ only in their
inputs (`training/inputs.py`: `TokenInputs`, `ActivationInputs`): where rows come from and how the
loss is read. Each trick (initialisation, dead-code replacement, checkpoints, collectives) is a
small function from a module of its own.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from tl_codebook.codebook import Codebook
from tl_codebook.files import locked_run_dir
from tl_codebook.training.checkpoint import (
    ensure_writable,
    load_latest_checkpoint,
    optimizer_state_from_checkpoint,
    optimizer_state_to_checkpoint,
    restore_rng_state,
    rng_state_to_checkpoint,
    save_checkpoint,
)
from tl_codebook.training.codebook_init import initialise_codebook, site_seed
from tl_codebook.training.config import TrainConfig
from tl_codebook.training.dead_codes import replace_dead_codes, reset_optimizer_rows
from tl_codebook.training.distributed import (
    DistInfo,
    all_reduce_sum,
    broadcast_from_main,
    ddp_device_kwargs,
    init_distributed,
)
from tl_codebook.training.inputs import ActivationInputs, CodebookStack, Rows, TokenInputs
from tl_codebook.training.metrics_log import MetricsLogger
from tl_codebook.training.run_dir import CHECKPOINT_DIR, DataIdentity, check_resume_has_checkpoint

DEAD_CODE_SAMPLES = 4096
"""Recent input rows (at most) that dead codes are re-seeded from, per codebook."""


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or infinite; a diagnostic checkpoint was written.

    A `RuntimeError`, not a user error: the settings were valid, the run itself broke (a
    learning rate too high, activations that overflow). The message names the step and the
    checkpoint (under `out_dir`; none without one).
    """


@dataclass
class TrainResult:
    """What a training run returns: how far it got, its losses, and the codebooks it trained."""

    steps: int
    """The step count reached (config.steps, counting the steps of earlier resumptions)."""
    final_loss: float
    """The loss of the last step (NaN when no step ran, e.g. resuming a finished run)."""
    history: list[dict[str, float]] = field(default_factory=list)
    """One dict of metrics (loss, dead-code fraction, tokens per second, ...) per logged step
    of this call (every `log_every` steps and the last), as written to metrics.jsonl."""
    out_dir: Path | None = None
    """The run directory (checkpoints, metrics.jsonl), or None without one."""
    codebooks: dict[str, Codebook] = field(default_factory=dict)
    """The trained codebooks by site (they are in the model, for `train_codebooks`)."""
    tokens: int = 0
    """Tokens (activation rows, on activations) the training steps consumed, over all ranks and
    over every resumption of the run; the initialisation's batches are not counted."""
    seconds: float = 0.0
    """Wall time of the training steps, summed over every resumption (initialisation apart)."""
    init_tokens: int = 0
    """Tokens (rows) the 'activations'/'kmeans' initialisation used (0: random or resumed)."""
    init_seconds: float = 0.0
    """Wall time of that initialisation (collecting activations, k-means)."""


def train_codebooks(
    model: HookedTransformer,
    data: Iterable[Tensor],
    config: TrainConfig,
    resume: bool = False,
    data_id: Any = None,
) -> TrainResult:
    """Train codebooks on `model` from token batches `data` (`Int[Tensor, "batch pos"]`).

    Codebooks named by `config.sites` are added to the model (sites that already hold a codebook
    keep it); with `mode="joint"` and no sites this is plain language-model training.
    `resume=True` continues exactly from the latest checkpoint in `config.out_dir`. Under
    torchrun each rank trains on its slice of every global batch. Checkpoints record the data
    (`data_id`, any JSON value naming it, and a fingerprint of the first batch); a resume on
    other data is refused.

    Args:
        model: the model; frozen mode leaves its weights alone, joint mode fine-tunes them.
        data: token batches `[batch, pos]` of integer ids in the model's vocabulary (at least
            `config.seq_len` tokens per row when it is set), enough for `config.steps` steps
            plus `init_batches` for a data-driven initialisation.
        config: every setting of the run (checked when it was built).
        resume: continue from the latest checkpoint in `config.out_dir` (a new run when the
            directory has none and no results).
        data_id: a JSON value naming the data, checked on resume.

    Returns:
        The `TrainResult`; the model holds the trained codebooks.

    Raises:
        ValueError: for bad inputs found before or while training: a frozen run without
            sites, an unknown site (`UnknownHookError`) or one the codebook does not fit,
            token batches of the wrong dtype, shape or vocabulary, `seq_len` above `n_ctx`,
            too few rows for the initialisation, data that runs out, or a resume that does not
            match its checkpoint (config, data, steps), has no `out_dir`, or finds results
            but no checkpoint there.
        TrainingDivergedError: when the loss becomes NaN or infinite.
        RunDirLockedError: (an OSError) when another process is training into `out_dir`.
    """
    return Trainer(model, data, config, data_id=data_id).run(resume=resume)


def train_codebooks_on_activations(
    codebooks: Codebook | Mapping[str, Codebook],
    batches: Iterable[Float[Tensor, "batch d_in"] | Mapping[str, Tensor]],
    config: TrainConfig,
    resume: bool = False,
    data_id: Any = None,
) -> TrainResult:
    """Frozen-mode training of `codebooks` on activations given directly (no model to run).

    The same trainer as `train_codebooks` (optimizer, schedule, initialisation from the first
    `init_batches` batches, dead-code replacement, checkpoints, metrics), reading activation rows
    instead of running a forward: each batch is `[rows, d_in]` (or `[rows, n_groups, d_group]`)
    for a single codebook, or a mapping from codebook name to such rows (all with the same number
    of rows). `config.mode` must be "frozen"; `sites`, `seq_len`, `kl_coef` and
    `exclude_token_ids` need a model and are refused or unused: exclude BOS rows before. The loss
    is `mse_coef` times each codebook's reconstruction MSE (`mse_reduction`). `data_id` names
    the data in checkpoints, as for `train_codebooks`.

    Returns:
        The `TrainResult`; the codebooks are trained in place.

    Raises:
        ValueError: for a mode other than "frozen", `sites` / `kl_coef` / `seq_len` set, no
            codebooks, a batch that is not one tensor per codebook, rows that are not float
            `[rows, d_in]` (or `[rows, n_groups, d_group]`), unequal row counts, too few rows
            for the initialisation, or a resume that does not match its checkpoint.
        TrainingDivergedError: when the loss becomes NaN or infinite.
        RunDirLockedError: (an OSError) when another process is training into `out_dir`.
    """
    if config.mode != "frozen":
        raise ValueError(
            f"train_codebooks_on_activations trains codebooks alone: TrainConfig.mode must be "
            f"'frozen', got {config.mode!r} (joint training needs a model: train_codebooks)."
        )
    for name in ("sites", "kl_coef", "seq_len"):
        if getattr(config, name):
            raise ValueError(
                f"train_codebooks_on_activations has no model, so TrainConfig.{name} has no "
                f"meaning; got {getattr(config, name)!r} (leave it at its default)."
            )
    if isinstance(codebooks, Codebook):
        named = {codebooks.cfg.hook_name or "codebook": codebooks}
    else:
        named = dict(codebooks)
    if not named or not all(isinstance(cb, Codebook) for cb in named.values()):
        raise ValueError(
            "train_codebooks_on_activations needs a Codebook or a non-empty mapping of name to "
            f"Codebook, got {codebooks!r:.80}."
        )
    return Trainer(CodebookStack(named), batches, config, data_id=data_id).run(resume=resume)


def lr_factor(step: int, config: TrainConfig) -> float:
    """Learning-rate multiplier at `step`: linear warm-up over `warmup_steps`, then constant, or a
    cosine or linear decay from 1 at the end of warm-up to `min_lr_fraction` at `steps`.

    A pure function of the step, so a resumed run needs no scheduler state beyond the step.

    Args:
        step: the 0-based step index.
        config: supplies `warmup_steps`, `schedule`, `steps` and `min_lr_fraction`.

    Returns:
        The factor in `[0, 1]` the base learning rates are multiplied by at `step`.
    """
    if config.warmup_steps and step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    if config.schedule == "constant":
        return 1.0
    span = max(1, config.steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)
    if config.schedule == "cosine":
        decay = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        decay = 1.0 - progress
    floor = config.min_lr_fraction
    return floor + (1.0 - floor) * decay


class Trainer:
    def __init__(
        self,
        model: HookedTransformer | CodebookStack,
        data: Iterable[Any],
        config: TrainConfig,
        data_id: Any = None,
    ):
        self.model, self.data, self.config = model, data, config
        self.data_identity = DataIdentity(data_id)
        self.device = _device_of(model)
        self.dist: DistInfo = init_distributed(self.device)
        self.inputs: TokenInputs | ActivationInputs = (
            ActivationInputs(model, config, self.device)
            if isinstance(model, CodebookStack)
            else TokenInputs(model, config, self.device)
        )
        self.codebooks = self.inputs.codebooks
        if config.mode == "frozen" and not self.codebooks:
            raise ValueError("Frozen mode trains only codebooks: give at least one site.")
        self.out_dir = Path(config.out_dir) if config.out_dir else None
        if self.out_dir is not None and self.dist.is_main:  # other ranks write nothing
            ensure_writable(self.out_dir)
        self._codebook_param_names = {f"{site}.codes" for site in self.codebooks}
        self.optimizer = self._make_optimizer()
        self.step_index = 0
        self.data_position = 0
        # Code usage, counted once per step from the codebooks' own statistics (which are reset
        # every step): hits since the last dead-code replacement, and everything since the last
        # log. Checkpointed, so a resumed run replaces and logs exactly as an uninterrupted one.
        self.window_hits = {n: torch.zeros_like(cb.code_hits) for n, cb in self.codebooks.items()}
        self.log_hits = {n: torch.zeros_like(cb.code_hits) for n, cb in self.codebooks.items()}
        self.log_squared_error = {
            n: torch.zeros((), dtype=torch.float64, device=cb.code_hits.device)
            for n, cb in self.codebooks.items()
        }
        self.log_tokens = {n: torch.zeros_like(cb.tokens_seen) for n, cb in self.codebooks.items()}
        self.history: list[dict[str, float]] = []
        self.codes_replaced = 0
        """Dead codes re-initialised so far in this run (logged as codes_replaced)."""
        self.tokens_trained = 0
        self.seconds_trained = 0.0

    # -- set-up ----------------------------------------------------------------------------------

    def _is_codebook(self, param_name: str) -> bool:
        return param_name in self._codebook_param_names

    def _make_optimizer(self) -> torch.optim.Optimizer:
        cfg = self.config
        groups: list[dict[str, Any]] = []
        codes = [cb.codes for cb in self.codebooks.values()]
        if codes:
            groups.append(
                {
                    "params": codes,
                    "lr": cfg.lr,
                    "weight_decay": cfg.codebook_weight_decay,
                    "base_lr": cfg.lr,
                }
            )
        if cfg.mode == "joint":
            model_params = [
                p
                for n, p in self.model.named_parameters()
                if not self._is_codebook(n) and p.requires_grad
            ]
            lr = cfg.lr * cfg.model_lr_factor
            groups.append(
                {
                    "params": model_params,
                    "lr": lr,
                    "weight_decay": cfg.model_weight_decay,
                    "base_lr": lr,
                }
            )
        return torch.optim.AdamW(groups, betas=(0.9, 0.999))

    # -- the run ---------------------------------------------------------------------------------

    def run(self, resume: bool = False) -> TrainResult:
        """Train to `config.steps`; the main rank holds `out_dir`'s lock for the whole run, so a
        second process training into the same directory fails at once instead of mixing runs."""
        holds_dir = self.out_dir is not None and self.dist.is_main
        with locked_run_dir(self.out_dir) if holds_dir else nullcontext():  # type: ignore[arg-type]
            return self._run(resume)

    def _run(self, resume: bool) -> TrainResult:
        cfg = self.config
        torch.manual_seed(cfg.seed)
        self.inputs.begin(self._is_codebook)
        loss_value = float("nan")
        logger = wandb_run = bar = None
        try:
            resumed = resume and self._resume()
            if resume and not resumed and self.dist.is_main and self.out_dir is not None:
                check_resume_has_checkpoint(self.out_dir)  # results but no checkpoint: refuse
                print(f"No checkpoint in {self.out_dir}; starting from step 0.")
            batches = self._batches()
            init_tokens, init_seconds = (0, 0.0) if resumed else self._initialise_codebooks(batches)
            ddp = self._wrap_ddp()
            if self.out_dir is not None and self.dist.is_main:
                logger = MetricsLogger(
                    self.out_dir, resume_step=self.step_index if resumed else None
                )
            wandb_run = self._start_wandb()
            bar = tqdm(
                total=cfg.steps,
                initial=self.step_index,
                desc=f"train ({cfg.mode})",
                disable=not (cfg.progress and self.dist.is_main),
                dynamic_ncols=True,
            )
            self.inputs.module.train()
            log_tokens, log_started = 0, time.perf_counter()
            while self.step_index < cfg.steps:
                started = time.perf_counter()
                batch = next(batches)
                tokens = self.inputs.count(batch) * self.dist.world_size
                loss_value, parts = self.step(ddp, self.inputs.shard(batch, self.dist))
                self.tokens_trained += tokens
                log_tokens += tokens
                self.seconds_trained += time.perf_counter() - started
                if self.step_index % cfg.log_every == 0 or self.step_index == cfg.steps:
                    speed = log_tokens / max(time.perf_counter() - log_started, 1e-9)
                    record = self._log_record(loss_value, parts, speed)
                    log_tokens, log_started = 0, time.perf_counter()
                    self.history.append(record)
                    if logger is not None:
                        logger.log(self.step_index, record)
                    if wandb_run is not None:
                        wandb_run.log(record, step=self.step_index)
                    bar.set_postfix(
                        loss=f"{loss_value:.4f}",
                        dead=f"{record.get('dead_fraction', 0.0):.1%}",
                        tok_s=f"{speed:.0f}",
                    )
                if cfg.checkpoint_every and self.step_index % cfg.checkpoint_every == 0:
                    self._save_checkpoint()
                bar.update(1)
            if cfg.checkpoint_every and self.step_index % cfg.checkpoint_every:
                self._save_checkpoint()
        finally:
            if bar is not None:
                bar.close()
            if logger is not None:
                logger.close()
            if wandb_run is not None:
                wandb_run.finish()
            self.inputs.end(trained=self.step_index > 0)
        return TrainResult(
            steps=self.step_index,
            final_loss=loss_value,
            history=self.history,
            out_dir=self.out_dir,
            codebooks=dict(self.codebooks),
            tokens=self.tokens_trained,
            seconds=self.seconds_trained,
            init_tokens=init_tokens,
            init_seconds=init_seconds,
        )

    def _batches(self) -> Iterator[Any]:
        """The data stream, positioned after the batches already consumed (for resumption)."""
        iterator = self.data_identity.watch(self.data)
        skipped = sum(1 for _ in itertools.islice(iterator, self.data_position))
        if skipped < self.data_position:
            raise ValueError(
                f"The data has only {skipped} batches, but the checkpoint consumed {self.data_position}."
            )

        def stream() -> Iterator[Any]:
            for batch in iterator:
                self.data_position += 1
                yield self.inputs.prepare(batch)
            raise ValueError(f"The data ran out after {self.data_position} batches.")

        return stream()

    def _wrap_ddp(self) -> nn.Module:
        if not self.dist.enabled:
            return self.inputs.module
        from torch.nn.parallel import DistributedDataParallel

        # Code-usage buffers are per-rank counts (summed explicitly), not state to broadcast.
        return DistributedDataParallel(
            self.inputs.module, broadcast_buffers=False, **ddp_device_kwargs(self.device)
        )

    def _autocast(self):  # noqa: ANN202
        if self.device.type == "cuda" and self.config.bf16_autocast:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return nullcontext()

    # -- one step --------------------------------------------------------------------------------

    def step(self, ddp: nn.Module, batch: Any) -> tuple[float, dict[str, Tensor]]:
        """One optimizer step on this rank's `batch`, then dead-code replacement when it is due.

        Returns the loss and its parts (tensors, read only at log steps).
        """
        cfg = self.config
        for group in self.optimizer.param_groups:
            group["lr"] = group["base_lr"] * lr_factor(self.step_index, cfg)
        replace_due = bool(cfg.dead_code_every) and (self.step_index + 1) % cfg.dead_code_every == 0
        with self._autocast():
            loss, parts, recent = self.inputs.loss(ddp, batch, keep_rows=replace_due)
        loss_value = loss.item()
        if not math.isfinite(loss_value):
            path = self._save_checkpoint(diagnostic=True)
            raise TrainingDivergedError(
                f"Loss became {loss_value} at step {self.step_index}; diagnostic checkpoint saved at {path}."
            )
        loss.backward()
        if cfg.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(
                [p for g in self.optimizer.param_groups for p in g["params"]], cfg.grad_clip
            )
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._count_usage()
        self.step_index += 1
        if recent is not None:
            self.codes_replaced += self._replace_dead_codes(recent)
        return loss_value, parts

    def _count_usage(self) -> None:
        """Move this step's code statistics into the trainer's windows (each hit counted once)."""
        for name, cb in self.codebooks.items():
            self.window_hits[name] += cb.code_hits
            self.log_hits[name] += cb.code_hits
            self.log_squared_error[name] += cb.squared_error_sum
            self.log_tokens[name] += cb.tokens_seen
            cb.reset_stats()

    # -- codebook hygiene ------------------------------------------------------------------------

    def _initialise_codebooks(self, batches: Iterator[Any]) -> tuple[int, float]:
        """'activations'/'kmeans' init from the first `init_batches` batches: (rows, seconds)."""
        cfg = self.config
        if cfg.codebook_init == "random" or not self.codebooks:
            return 0, 0.0
        started = time.perf_counter()
        sample = [next(batches) for _ in range(cfg.init_batches)]
        inputs = self.inputs.init_rows(sample)
        for name, cb in tqdm(
            self.codebooks.items(),
            desc=f"init codebooks ({cfg.codebook_init})",
            disable=not (cfg.progress and self.dist.is_main),
        ):
            rows = inputs[name]
            if rows.shape[0] < cb.cfg.num_codes:
                raise ValueError(
                    f"{cfg.codebook_init} init of {name!r} needs at least num_codes={cb.cfg.num_codes} "
                    f"input rows, but {cfg.init_batches} batches gave {rows.shape[0]} (excluded "
                    "tokens not counted); raise init_batches."
                )
            initialise_codebook(
                cb,
                rows,
                cfg.codebook_init,
                seed=site_seed(cfg.seed, name),
                kmeans_iters=cfg.kmeans_iters,
            )
            broadcast_from_main(cb.codes.data, self.dist)
            cb.reset_stats()
        used = sum(self.inputs.count(b) for b in sample) * self.dist.world_size
        return used, time.perf_counter() - started

    def _replace_dead_codes(self, recent: Rows) -> int:
        """Re-seed codes unused since the last replacement at this step's inputs (same on every
        rank: the counts are summed and rank 0's codes are broadcast)."""
        replaced = 0
        generator = torch.Generator().manual_seed(self.config.seed * 1_000_003 + self.step_index)
        for name, cb in self.codebooks.items():
            hits = all_reduce_sum(self.window_hits[name].clone(), self.dist)
            dead = hits == 0
            rows = recent[name]
            if bool(dead.any()) and rows.shape[0]:
                order = torch.randperm(rows.shape[0], generator=generator)[:DEAD_CODE_SAMPLES]
                replaced += int(
                    replace_dead_codes(
                        cb.codes.data,
                        hits,
                        rows[order.to(rows.device)].to(cb.codes.device),
                        self.config.dead_code_noise,
                        generator,
                    ).sum()
                )
                broadcast_from_main(cb.codes.data, self.dist)
                reset_optimizer_rows(self.optimizer, cb.codes, dead)
            self.window_hits[name].zero_()
        return replaced

    # -- logging ---------------------------------------------------------------------------------

    def _log_record(
        self, loss: float, parts: dict[str, Tensor], tokens_per_second: float
    ) -> dict[str, float]:
        record: dict[str, float] = {"loss": loss}
        record.update({k: float(v) for k, v in parts.items()})
        record["tokens_per_second"] = tokens_per_second
        record["lr"] = self.optimizer.param_groups[0]["lr"]
        if self.config.dead_code_every:
            record["codes_replaced"] = float(self.codes_replaced)
        dead, total = 0, 0
        for name, cb in self.codebooks.items():
            hits = all_reduce_sum(self.log_hits[name].clone(), self.dist)
            sq = all_reduce_sum(self.log_squared_error[name].clone(), self.dist)
            seen = all_reduce_sum(self.log_tokens[name].clone(), self.dist)
            dead += int((hits == 0).sum())
            total += hits.numel()
            record[f"dead_fraction/{name}"] = float((hits == 0).float().mean())
            record[f"codebook_mse/{name}"] = float(sq) / max(1, int(seen) * cb.cfg.d_in)
            self.log_hits[name].zero_()
            self.log_squared_error[name].zero_()
            self.log_tokens[name].zero_()
        if total:
            record["dead_fraction"] = dead / total
        return record

    def _start_wandb(self):  # noqa: ANN202
        if not self.config.wandb_project or not self.dist.is_main:
            return None
        try:
            import wandb
        except ImportError:
            raise ValueError(
                "wandb_project is set but wandb is not installed: pip install wandb, or leave it unset."
            ) from None
        return wandb.init(project=self.config.wandb_project, config=self.config.to_dict())

    # -- checkpoints -----------------------------------------------------------------------------

    _COUNTERS = ("window_hits", "log_hits", "log_squared_error", "log_tokens")

    def _state_tensors(self) -> dict[str, Tensor]:
        tensors = {f"codebook.{n}.codes": cb.codes.detach() for n, cb in self.codebooks.items()}
        for counter in self._COUNTERS:
            tensors.update({f"{counter}.{n}": t for n, t in getattr(self, counter).items()})
        tensors.update(self.inputs.state_tensors(skip=self._codebook_param_names))
        return tensors

    def _save_checkpoint(self, diagnostic: bool = False) -> Path | None:
        if self.out_dir is None or not self.dist.is_main:
            return None
        tensors = self._state_tensors()
        optim_tensors, optim_state = optimizer_state_to_checkpoint(self.optimizer.state_dict())
        rng_tensors, rng_state = rng_state_to_checkpoint()
        state = {
            "config": self.config.to_dict(),
            "step": self.step_index,
            "data_position": self.data_position,
            "data": self.data_identity.to_state(),
            "codes_replaced": self.codes_replaced,
            "tokens_trained": self.tokens_trained,
            "seconds_trained": self.seconds_trained,
            "optimizer": optim_state,
            "rng": rng_state,
            "codebooks": {n: cb.cfg.to_dict() for n, cb in self.codebooks.items()},
        }
        directory = self.out_dir / ("diagnostics" if diagnostic else CHECKPOINT_DIR)
        return save_checkpoint(
            directory,
            self.step_index,
            {**tensors, **optim_tensors, **rng_tensors},
            state,
            keep_last=None if diagnostic else self.config.keep_checkpoints,
        )

    def _resume(self) -> bool:
        if self.out_dir is None:
            raise ValueError("resume=True needs config.out_dir (where the checkpoints are).")
        checkpoint = load_latest_checkpoint(self.out_dir / CHECKPOINT_DIR, device=self.device)
        if checkpoint is None:
            return False
        state, tensors = checkpoint.state, checkpoint.tensors
        self._check_resumable(state)
        wanted = [f"codebook.{n}.codes" for n in self.codebooks] + [
            f"{counter}.{n}" for counter in self._COUNTERS for n in self.codebooks
        ]
        missing = [key for key in wanted if key not in tensors] + [
            key
            for key in ("codes_replaced", "tokens_trained", "seconds_trained")
            if key not in state
        ]
        if missing:
            raise ValueError(
                f"Cannot resume from {self.out_dir}: its checkpoint lacks {', '.join(missing[:4])} "
                "(written by another version of tl_codebook, or for other codebooks)."
            )
        with torch.no_grad():
            for name, cb in self.codebooks.items():
                cb.codes.copy_(tensors[f"codebook.{name}.codes"])
                cb.reset_stats()
                for counter in self._COUNTERS:
                    getattr(self, counter)[name].copy_(tensors[f"{counter}.{name}"])
            self.inputs.load_state_tensors(tensors)
        self.optimizer.load_state_dict(optimizer_state_from_checkpoint(tensors, state["optimizer"]))
        restore_rng_state(tensors, state["rng"])
        self.step_index = int(state["step"])
        self.data_position = int(state["data_position"])
        self.codes_replaced = int(state["codes_replaced"])
        self.tokens_trained = int(state["tokens_trained"])
        self.seconds_trained = float(state["seconds_trained"])
        return True

    def _check_resumable(self, state: Mapping[str, Any]) -> None:
        """Refuse a checkpoint whose run computed something else than this config would."""
        where = f"Cannot resume from {self.out_dir}"
        saved = state["config"]
        differing = self.config.differences(saved)
        if differing:
            detail = "; ".join(
                f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in differing.items()
            )
            raise ValueError(f"{where}: the config differs ({detail}).")
        self.data_identity.expect(state.get("data"))
        step, steps = int(state["step"]), self.config.steps
        if steps < step:
            raise ValueError(
                f"{where}: steps={steps} is below the checkpoint's step {step} "
                f"(give steps >= {step})."
            )
        if steps != saved.get("steps") and self.config.schedule != "constant":
            raise ValueError(
                f"{where}: steps={steps} differs from the checkpoint's steps={saved.get('steps')}, "
                f"and the {self.config.schedule!r} schedule decays over steps, so the result "
                f"would differ (resume with steps={saved.get('steps')}; only the constant "
                "schedule can be extended)."
            )


def _device_of(module: nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    return torch.device("cpu")
