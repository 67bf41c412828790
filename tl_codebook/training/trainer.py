"""The training loop: codebooks alone on a frozen model, or jointly with the model (the paper's
method), resumable from atomic checkpoints and data-parallel under torchrun.

Reads top to bottom: `train_codebooks` builds a `Trainer`, which places the codebooks, checks
every input, initialises, then loops `step()`. Each trick (k-means init, dead-code replacement,
checkpoints, distributed collectives) is a small function from a module of its own.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from tl_codebook.codebook import Codebook
from tl_codebook.hooks.model import attach_codebook, codebooks_disabled, codebooks_of
from tl_codebook.training.checkpoint import (
    ensure_writable,
    load_latest_checkpoint,
    optimizer_state_from_checkpoint,
    optimizer_state_to_checkpoint,
    restore_rng_state,
    rng_state_to_checkpoint,
    save_checkpoint,
)
from tl_codebook.training.config import TrainConfig
from tl_codebook.training.dead_codes import replace_dead_codes, reset_optimizer_rows
from tl_codebook.training.distributed import (
    DistInfo,
    all_reduce_sum,
    broadcast_from_main,
    init_distributed,
    shard_batch,
)
from tl_codebook.training.kmeans import kmeans_grouped
from tl_codebook.training.metrics_log import MetricsLogger
from tl_codebook.training.sites import resolve_sites

CHECKPOINT_DIR = "checkpoints"


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or infinite; a diagnostic checkpoint was written."""


@dataclass
class TrainResult:
    steps: int
    final_loss: float
    history: list[dict[str, float]] = field(default_factory=list)
    out_dir: Path | None = None
    codebooks: dict[str, Codebook] = field(default_factory=dict)


def train_codebooks(
    model: HookedTransformer,
    data: Iterable[Tensor],
    config: TrainConfig,
    resume: bool = False,
) -> TrainResult:
    """Train codebooks on `model` from token batches `data` (`Int[Tensor, "batch pos"]`).

    Codebooks named by `config.sites` are added to the model (sites that already hold a codebook
    keep it). `resume=True` continues exactly from the latest checkpoint in `config.out_dir`.
    Under torchrun each rank trains on its slice of every global batch.
    """
    return Trainer(model, data, config).run(resume=resume)


def lr_factor(step: int, config: TrainConfig) -> float:
    """Learning-rate multiplier at `step`: linear warm-up, then constant, cosine or linear decay.

    A pure function of the step, so a resumed run needs no scheduler state beyond the step.
    """
    if config.warmup_steps and step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    if config.schedule == "constant":
        return 1.0
    span = max(1, config.steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)
    if config.schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0 - progress


class Trainer:
    def __init__(self, model: HookedTransformer, data: Iterable[Tensor], config: TrainConfig):
        self.model, self.data, self.config = model, data, config
        self.device = next(model.parameters()).device
        self.dist: DistInfo = init_distributed(self.device)
        self._check_inputs()
        self.out_dir = Path(config.out_dir) if config.out_dir else None
        if self.out_dir is not None:
            ensure_writable(self.out_dir)
        for name, cb_cfg in self._new_sites().items():
            attach_codebook(model, Codebook(cb_cfg).to(self.device), name)
        self.codebooks = codebooks_of(model)
        self._codebook_param_names = {f"{site}.codes" for site in self.codebooks}
        self.base_requires_grad = {
            n: p.requires_grad for n, p in model.named_parameters() if not self._is_codebook(n)
        }
        self.optimizer = self._make_optimizer()
        self.step_index = 0
        self.data_position = 0
        self.hits_window = {n: torch.zeros_like(cb.code_hits) for n, cb in self.codebooks.items()}
        self.history: list[dict[str, float]] = []
        self.codes_replaced = 0
        """Dead codes re-initialised so far in this run (logged as codes_replaced)."""

    # -- set-up ----------------------------------------------------------------------------------

    def _check_inputs(self) -> None:
        cfg, model = self.config, self.model
        if cfg.seq_len is not None and cfg.seq_len > model.cfg.n_ctx:
            raise ValueError(
                f"seq_len={cfg.seq_len} is longer than the model's context n_ctx={model.cfg.n_ctx}."
            )
        if cfg.mode == "joint" and not any(True for _ in model.parameters()):
            raise ValueError("Joint mode needs a model with parameters.")

    def _new_sites(self) -> dict[str, Any]:
        wanted = resolve_sites(
            self.model, self.config.sites, self.config.codebook_defaults(), self.config.layers
        )
        present = codebooks_of(self.model)
        return {name: c for name, c in wanted.items() if name not in present}

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
        cfg, model = self.config, self.model
        torch.manual_seed(cfg.seed)
        if cfg.mode == "frozen":
            for n, p in model.named_parameters():
                if not self._is_codebook(n):
                    p.requires_grad_(False)
        resumed = resume and self._resume()
        if resume and not resumed and self.dist.is_main:
            print(f"No checkpoint in {self.out_dir}; starting from step 0.")
        batches = self._batches()
        if not resumed:
            self._initialise_codebooks(batches)
        ddp = self._wrap_ddp()
        logger = (
            MetricsLogger(self.out_dir, resume_step=self.step_index if resumed else None)
            if self.out_dir is not None and self.dist.is_main
            else None
        )
        wandb_run = self._start_wandb()
        bar = tqdm(
            total=cfg.steps,
            initial=self.step_index,
            desc=f"train ({cfg.mode})",
            disable=not (cfg.progress and self.dist.is_main),
            dynamic_ncols=True,
        )
        loss_value = float("nan")
        tokens_done, started = 0, time.perf_counter()
        try:
            model.train()
            while self.step_index < cfg.steps:
                tokens = shard_batch(next(batches), self.dist)  # this rank's slice
                loss_value, parts = self.step(ddp, tokens)
                tokens_done += tokens.numel()
                self.step_index += 1
                if cfg.dead_code_every and self.step_index % cfg.dead_code_every == 0:
                    self.codes_replaced += self._replace_dead_codes(tokens)
                if self.step_index % cfg.log_every == 0 or self.step_index == cfg.steps:
                    record = self._log_record(
                        loss_value, parts, tokens_done / (time.perf_counter() - started)
                    )
                    self.history.append(record)
                    if logger is not None:
                        logger.log(self.step_index, record)
                    if wandb_run is not None:
                        wandb_run.log(record, step=self.step_index)
                    bar.set_postfix(
                        loss=f"{loss_value:.4f}",
                        dead=f"{record.get('dead_fraction', 0.0):.1%}",
                        tok_s=f"{record['tokens_per_second']:.0f}",
                    )
                if cfg.checkpoint_every and self.step_index % cfg.checkpoint_every == 0:
                    self._save_checkpoint()
                bar.update(1)
            if cfg.checkpoint_every and self.step_index % cfg.checkpoint_every:
                self._save_checkpoint()
        finally:
            bar.close()
            if logger is not None:
                logger.close()
            if wandb_run is not None:
                wandb_run.finish()
            for n, p in model.named_parameters():
                if n in self.base_requires_grad:
                    p.requires_grad_(self.base_requires_grad[n])
            model.eval()
        if cfg.mode == "joint":
            model.fine_tuned = True  # type: ignore[assignment]
        return TrainResult(
            steps=self.step_index,
            final_loss=loss_value,
            history=self.history,
            out_dir=self.out_dir,
            codebooks=dict(self.codebooks),
        )

    def _batches(self) -> Iterator[Tensor]:
        """The data stream, positioned after the batches already consumed (for resumption)."""
        iterator = iter(self.data)
        skipped = sum(1 for _ in itertools.islice(iterator, self.data_position))
        if skipped < self.data_position:
            raise ValueError(
                f"The data has only {skipped} batches, but the checkpoint consumed {self.data_position}."
            )

        def stream() -> Iterator[Tensor]:
            for batch in iterator:
                self.data_position += 1
                yield self._prepare(batch)
            raise ValueError(f"The data ran out after {self.data_position} batches.")

        return stream()

    def _prepare(self, batch: Any) -> Tensor:
        tokens = torch.as_tensor(batch)
        if tokens.ndim != 2 or tokens.dtype not in (torch.long, torch.int32, torch.int64):
            raise ValueError(
                f"Expected token batches Int[Tensor, 'batch pos'], got dtype {tokens.dtype} shape {tuple(tokens.shape)}."
            )
        seq_len = self.config.seq_len
        if seq_len is not None:
            if tokens.shape[1] < seq_len:
                raise ValueError(
                    f"Batch of {tokens.shape[1]} tokens per row is shorter than seq_len={seq_len}."
                )
            tokens = tokens[:, :seq_len]
        if tokens.shape[1] > self.model.cfg.n_ctx:
            raise ValueError(
                f"Sequences of {tokens.shape[1]} tokens are longer than the model's n_ctx={self.model.cfg.n_ctx}."
            )
        return tokens.long().to(self.device)

    def _wrap_ddp(self) -> torch.nn.Module:
        if not self.dist.enabled:
            return self.model
        from torch.nn.parallel import DistributedDataParallel

        # Code-usage buffers are per-rank counts (summed explicitly), not state to broadcast.
        return DistributedDataParallel(self.model, broadcast_buffers=False)

    def _autocast(self):  # noqa: ANN202
        if self.device.type == "cuda" and self.config.bf16_autocast:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return nullcontext()

    # -- one step --------------------------------------------------------------------------------

    def step(self, ddp: torch.nn.Module, tokens: Tensor) -> tuple[float, dict[str, float]]:
        cfg = self.config
        for group in self.optimizer.param_groups:
            group["lr"] = group["base_lr"] * lr_factor(self.step_index, cfg)
        with self._autocast():
            loss, parts = (
                self._frozen_loss(ddp, tokens)
                if cfg.mode == "frozen"
                else self._joint_loss(ddp, tokens)
            )
        if not torch.isfinite(loss):
            path = self._save_checkpoint(diagnostic=True)
            raise TrainingDivergedError(
                f"Loss became {loss.item()} at step {self.step_index}; diagnostic checkpoint saved at {path}."
            )
        loss.backward()
        if cfg.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(
                [p for g in self.optimizer.param_groups for p in g["params"]], cfg.grad_clip
            )
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        for name, cb in self.codebooks.items():
            self.hits_window[name] += cb.code_hits
        return loss.item(), parts

    def _joint_loss(self, ddp: torch.nn.Module, tokens: Tensor) -> tuple[Tensor, dict[str, float]]:
        loss = ddp(tokens, return_type="loss")
        return loss, {"lm_loss": loss.item()}

    def _frozen_loss(self, ddp: torch.nn.Module, tokens: Tensor) -> tuple[Tensor, dict[str, float]]:
        """Reconstruction MSE at every codebook (+ KL to the base model): only codes learn."""
        cfg, model = self.config, self.model
        seen: dict[str, dict[str, Tensor]] = {name: {} for name in self.codebooks}

        def keep(act: Tensor, hook: Any) -> None:
            site, _, which = hook.name.rpartition(".")
            seen[site][which] = act

        hooks: list[tuple[str | Callable[..., Any], Callable[..., Any]]] = [
            (f"{name}.{which}", keep)
            for name in self.codebooks
            for which in ("hook_codebook_in", "hook_codebook_out")
        ]
        base_logits = None
        if cfg.kl_coef:
            with torch.no_grad(), codebooks_disabled(model):
                base_logits = model(tokens)
        for cb in self.codebooks.values():
            cb.snap_gradient_terms = False  # the explicit MSE below replaces the built-in term
        try:
            with model.hooks(fwd_hooks=hooks):
                if base_logits is not None:
                    logits = ddp(tokens)
                else:  # no KL: the forward can stop after the last codebook's block
                    logits = None
                    ddp(tokens, stop_at_layer=self._stop_layer())
        finally:
            for cb in self.codebooks.values():
                cb.snap_gradient_terms = True
        parts: dict[str, float] = {}
        loss = torch.zeros((), device=self.device)
        for name, acts in seen.items():
            mse = (
                (acts["hook_codebook_out"].float() - acts["hook_codebook_in"].detach().float())
                .pow(2)
                .mean()
            )
            parts[f"mse/{name}"] = mse.item()
            loss = loss + cfg.mse_coef * mse
        if base_logits is not None and logits is not None:
            kl = F.kl_div(
                F.log_softmax(logits.float(), -1).flatten(0, -2),
                F.log_softmax(base_logits.float(), -1).flatten(0, -2),
                log_target=True,
                reduction="batchmean",
            )
            parts["kl"] = kl.item()
            loss = loss + cfg.kl_coef * kl
        return loss, parts

    def _stop_layer(self) -> int | None:
        """One past the last block holding a codebook (None: a site after the blocks)."""
        layers = []
        for name in self.codebooks:
            head, _, rest = name.partition(".")
            if head != "blocks":
                return None
            layers.append(int(rest.split(".", 1)[0]))
        last = max(layers) + 1
        return None if last >= self.model.cfg.n_layers else last

    # -- codebook hygiene ------------------------------------------------------------------------

    def _collect_inputs(self, batches: list[Tensor], bypass: bool) -> dict[str, Tensor]:
        """Each codebook's input rows `[n, n_groups, d_group]` on `batches`.

        `bypass=True` reads the base model's activations (codebooks disabled: the site's own hook
        then sees the unsnapped input); otherwise the inputs with all codebooks in place.
        """
        rows: dict[str, list[Tensor]] = {name: [] for name in self.codebooks}

        def keep(act: Tensor, hook: Any) -> None:
            site = hook.name if bypass else hook.name.rpartition(".")[0]
            cb = self.codebooks[site]
            rows[site].append(act.detach().reshape(-1, cb.cfg.n_groups, cb.cfg.d_group))

        suffix = "" if bypass else ".hook_codebook_in"
        hooks: list[tuple[str | Callable[..., Any], Callable[..., Any]]] = [
            (f"{name}{suffix}", keep) for name in self.codebooks
        ]
        bypassed = codebooks_disabled(self.model) if bypass else nullcontext()
        with torch.no_grad(), bypassed, self.model.hooks(fwd_hooks=hooks):
            for tokens in batches:
                self.model(tokens, stop_at_layer=self._stop_layer())
        return {name: torch.cat(parts) for name, parts in rows.items()}

    def _initialise_codebooks(self, batches: Iterator[Tensor]) -> None:
        cfg = self.config
        if cfg.codebook_init == "random" or not self.codebooks:
            return
        sample = [next(batches) for _ in range(cfg.init_batches)]
        inputs = self._collect_inputs(sample, bypass=True)
        generator = torch.Generator().manual_seed(cfg.seed)
        for name, cb in tqdm(
            self.codebooks.items(),
            desc=f"init codebooks ({cfg.codebook_init})",
            disable=not (cfg.progress and self.dist.is_main),
        ):
            rows = inputs[name]
            if rows.shape[0] < cb.cfg.num_codes:
                raise ValueError(
                    f"{cfg.codebook_init} init of {name!r} needs at least num_codes={cb.cfg.num_codes} "
                    f"input rows, but {cfg.init_batches} batches gave {rows.shape[0]}; raise init_batches."
                )
            with torch.no_grad():
                if cfg.codebook_init == "kmeans":
                    cb.codes.copy_(
                        kmeans_grouped(
                            rows, cb.cfg.num_codes, n_iters=cfg.kmeans_iters, seed=cfg.seed
                        )
                    )
                else:
                    cb.init_from_activations(rows, generator=generator)
                broadcast_from_main(cb.codes.data, self.dist)
            cb.reset_stats()

    def _replace_dead_codes(self, tokens: Tensor) -> int:
        """Re-seed codes unused since the last replacement at recent inputs (same on every rank)."""
        inputs = self._collect_inputs([tokens], bypass=False)
        replaced = 0
        generator = torch.Generator().manual_seed(self.config.seed * 1_000_003 + self.step_index)
        for name, cb in self.codebooks.items():
            hits = all_reduce_sum(self.hits_window[name].clone(), self.dist)
            dead = hits == 0
            if bool(dead.any()):
                rows = inputs[name][
                    torch.randperm(inputs[name].shape[0], generator=generator)[:4096]
                ]
                replaced += int(
                    replace_dead_codes(
                        cb.codes.data,
                        hits,
                        rows.cpu().to(cb.codes.device),
                        self.config.dead_code_noise,
                        generator,
                    ).sum()
                )
                broadcast_from_main(cb.codes.data, self.dist)
                reset_optimizer_rows(self.optimizer, cb.codes, dead)
            self.hits_window[name].zero_()
        return replaced

    # -- logging ---------------------------------------------------------------------------------

    def _log_record(
        self, loss: float, parts: dict[str, float], tokens_per_second: float
    ) -> dict[str, float]:
        record: dict[str, float] = {"loss": loss, **parts, "tokens_per_second": tokens_per_second}
        record["lr"] = self.optimizer.param_groups[0]["lr"]
        if self.config.dead_code_every:
            record["codes_replaced"] = float(self.codes_replaced)
        dead, total = 0, 0
        for name, cb in self.codebooks.items():
            hits = all_reduce_sum(cb.code_hits.clone(), self.dist)
            sq = all_reduce_sum(cb.squared_error_sum.clone(), self.dist)
            seen = all_reduce_sum(cb.tokens_seen.clone(), self.dist)
            dead += int((hits == 0).sum())
            total += hits.numel()
            record[f"dead_fraction/{name}"] = float((hits == 0).float().mean())
            record[f"codebook_mse/{name}"] = float(sq) / max(1, int(seen) * cb.cfg.d_in)
            cb.reset_stats()
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

    def _state_tensors(self) -> dict[str, Tensor]:
        tensors = {f"codebook.{n}.codes": cb.codes.detach() for n, cb in self.codebooks.items()}
        tensors.update({f"hits_window.{n}": h for n, h in self.hits_window.items()})
        if self.config.mode == "joint":
            skip = {f"{n}.codes" for n in self.codebooks}
            tensors.update(
                {f"model.{k}": v for k, v in self.model.state_dict().items() if k not in skip}
            )
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
        differing = self.config.differences(state["config"])
        if differing:
            detail = "; ".join(
                f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in differing.items()
            )
            raise ValueError(f"Cannot resume from {self.out_dir}: the config differs ({detail}).")
        with torch.no_grad():
            for name, cb in self.codebooks.items():
                cb.codes.copy_(tensors[f"codebook.{name}.codes"])
                self.hits_window[name].copy_(tensors[f"hits_window.{name}"])
            if self.config.mode == "joint":
                prefix = "model."
                model_state = {
                    k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)
                }
                self.model.load_state_dict(model_state, strict=False)
        self.optimizer.load_state_dict(optimizer_state_from_checkpoint(tensors, state["optimizer"]))
        restore_rng_state(tensors, state["rng"])
        self.step_index = int(state["step"])
        self.data_position = int(state["data_position"])
        return True
