"""What the trainer reads: token batches run through a model (`TokenInputs`) or activation
batches given directly (`ActivationInputs`, on a `CodebookStack`).

The two share one small interface (prepare a batch, shard it, count it, collect init rows, give
the loss, save and load their own state), so `Trainer` has one loop and one set of tricks for
both; only where rows come from and how the loss is read differ.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn
from transformer_lens import HookedTransformer

from tl_codebook.codebook import Codebook
from tl_codebook.hooks.model import attach_codebook, codebooks_disabled, codebooks_of
from tl_codebook.snap import gather_mean
from tl_codebook.training.codebook_init import initialise_codebook, kept_positions, site_seed
from tl_codebook.training.config import TrainConfig
from tl_codebook.training.distributed import (
    DistInfo,
    shard_batch,
)
from tl_codebook.training.sites import resolve_sites


def reconstruction_mse(
    reconstruction: Float[Tensor, "rows ..."], target: Float[Tensor, "rows ..."], reduction: str
) -> Float[Tensor, ""]:
    """Squared error in float32, averaged over rows and dimensions ("mean") or summed over the
    dimensions and averaged over rows ("sum_over_dims", SAELens' MSE)."""
    squared = (reconstruction.float() - target.float()).pow(2)
    if reduction == "mean":
        return squared.mean()
    return squared.reshape(squared.shape[0], -1).sum(-1).mean()


class CodebookStack(nn.Module):
    """Codebooks trained on activations given directly: the module the trainer (and DDP) runs in
    place of a model. `forward` snaps each codebook's rows."""

    def __init__(self, codebooks: Mapping[str, Codebook]):
        super().__init__()
        self.names = list(codebooks)
        self.stack = nn.ModuleList(codebooks.values())  # ModuleDict keys cannot hold dots

    @property
    def codebooks(self) -> dict[str, Codebook]:
        return dict(zip(self.names, self.stack, strict=True))  # type: ignore[arg-type]

    def forward(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {name: cb(batch[name]) for name, cb in zip(self.names, self.stack, strict=True)}


# -- what the trainer reads ---------------------------------------------------------------------


Rows = dict[str, Tensor]
"""Each codebook's input rows `[n, n_groups, d_group]`, by codebook name."""


class TokenInputs:
    """Token batches run through `model`: codebooks read its activations at their sites.

    Positions holding an excluded token (BOS by default) are never rows for the initialisation
    or dead-code replacement.
    """

    def __init__(self, model: HookedTransformer, config: TrainConfig, device: torch.device):
        self.model, self.config, self.device = model, config, device
        if config.seq_len is not None and config.seq_len > model.cfg.n_ctx:
            raise ValueError(
                f"seq_len={config.seq_len} is longer than the model's context n_ctx={model.cfg.n_ctx}."
            )
        if config.mode == "joint" and not any(True for _ in model.parameters()):
            raise ValueError("Joint mode needs a model with parameters.")
        self.exclude_token_ids = self._exclusions()
        wanted = resolve_sites(model, config.sites, config.codebook_defaults(), config.layers)
        present = codebooks_of(model)
        for name, cb_cfg in wanted.items():
            if name in present:
                continue
            codebook = Codebook(cb_cfg)
            initialise_codebook(codebook, None, "random", seed=site_seed(config.seed, name))
            attach_codebook(model, codebook.to(device), name)
        self.codebooks = codebooks_of(model)
        self.frozen_names: list[str] = []

    def _exclusions(self) -> list[int]:
        ids = self.config.exclude_token_ids
        if ids is None:
            bos = getattr(getattr(self.model, "tokenizer", None), "bos_token_id", None)
            return [] if bos is None else [int(bos)]
        d_vocab = self.model.cfg.d_vocab
        outside = [i for i in ids if i >= d_vocab]
        if outside:
            raise ValueError(
                f"TrainConfig.exclude_token_ids {outside} lie outside the model's vocabulary "
                f"[0, {d_vocab})."
            )
        return list(ids)

    @property
    def module(self) -> nn.Module:
        return self.model

    def begin(self, is_codebook: Callable[[str], bool]) -> None:
        """Frozen mode: only codebooks keep `requires_grad` (restored by `end`)."""
        if self.config.mode == "frozen":
            for n, p in self.model.named_parameters():
                if not is_codebook(n) and p.requires_grad:
                    p.requires_grad_(False)
                    self.frozen_names.append(n)

    def end(self, trained: bool) -> None:
        """Restore `requires_grad`; after joint steps the model's weights are its own (saved
        with its codebooks: `fine_tuned`)."""
        params = dict(self.model.named_parameters())
        for n in self.frozen_names:
            params[n].requires_grad_(True)
        self.frozen_names = []
        self.model.eval()
        if self.config.mode == "joint" and trained:
            self.model.fine_tuned = True  # type: ignore[assignment]

    def prepare(self, batch: Any) -> Tensor:
        tokens = torch.as_tensor(batch)
        if tokens.ndim != 2 or tokens.dtype not in (torch.long, torch.int32, torch.int64):
            raise ValueError(
                f"Expected token batches Int[Tensor, 'batch pos'], got dtype {tokens.dtype} shape {tuple(tokens.shape)}."
            )
        if tokens.numel() == 0:
            raise ValueError(f"A token batch of shape {tuple(tokens.shape)} holds no tokens.")
        low, high = int(tokens.min()), int(tokens.max())
        if low < 0 or high >= self.model.cfg.d_vocab:
            raise ValueError(
                f"Token ids must lie in the model's vocabulary [0, {self.model.cfg.d_vocab}); "
                f"a batch holds ids from {low} to {high}."
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

    def shard(self, tokens: Tensor, dist: DistInfo) -> Tensor:
        return shard_batch(tokens, dist)

    def count(self, tokens: Tensor) -> int:
        return tokens.numel()

    def _rows(self, name: str, act: Tensor, tokens: Tensor) -> Tensor:
        """`act` at codebook `name` as rows, without the excluded positions."""
        cb = self.codebooks[name]
        rows = act.detach().reshape(-1, cb.cfg.n_groups, cb.cfg.d_group)
        if not self.exclude_token_ids:
            return rows
        if rows.shape[0] != tokens.numel():
            raise ValueError(
                f"Cannot exclude tokens at {name!r}: its activation {tuple(act.shape)} has no "
                f"row per position of the batch {tuple(tokens.shape)}; set exclude_token_ids=[]."
            )
        return rows[kept_positions(tokens, self.exclude_token_ids).flatten()]

    def init_rows(self, batches: list[Tensor]) -> Rows:
        """The base model's activations at every codebook (all codebooks bypassed)."""
        rows: dict[str, list[Tensor]] = {name: [] for name in self.codebooks}
        current: list[Tensor] = []

        def keep(act: Tensor, hook: Any) -> None:
            rows[hook.name].append(self._rows(hook.name, act, current[0]))

        hooks: list[tuple[str | Callable[..., Any], Callable[..., Any]]] = [
            (name, keep) for name in self.codebooks
        ]
        with torch.no_grad(), codebooks_disabled(self.model), self.model.hooks(fwd_hooks=hooks):
            for tokens in batches:
                current[:] = [tokens]
                self.model(tokens, stop_at_layer=self._stop_layer())
        return {name: torch.cat(parts) for name, parts in rows.items()}

    def loss(
        self, module: nn.Module, tokens: Tensor, keep_rows: bool
    ) -> tuple[Tensor, dict[str, Tensor], Rows | None]:
        if self.config.mode == "frozen":
            return self._frozen_loss(module, tokens, keep_rows)
        return self._joint_loss(module, tokens, keep_rows)

    def _joint_loss(
        self, module: nn.Module, tokens: Tensor, keep_rows: bool
    ) -> tuple[Tensor, dict[str, Tensor], Rows | None]:
        """The language-model loss with the codebooks in place (the paper's joint training)."""
        seen: Rows = {}

        def keep(act: Tensor, hook: Any) -> None:
            site = hook.name.rpartition(".")[0]
            seen[site] = self._rows(site, act, tokens)

        hooks: list[tuple[str | Callable[..., Any], Callable[..., Any]]] = [
            (f"{name}.hook_codebook_in", keep) for name in self.codebooks
        ]
        with self.model.hooks(fwd_hooks=hooks) if keep_rows else nullcontext():
            loss = module(tokens, return_type="loss")
        return loss, {"lm_loss": loss.detach()}, seen if keep_rows else None

    def _frozen_loss(
        self, module: nn.Module, tokens: Tensor, keep_rows: bool
    ) -> tuple[Tensor, dict[str, Tensor], Rows | None]:
        """Each codebook's reconstruction MSE (+ KL to the base model): only codes learn.

        The MSE is taken on the codes gathered at the chosen ids, not on the straight-through
        output, so a codebook learns only from its own reconstruction: the straight-through
        path (through the frozen network into earlier codebooks) carries the KL alone.
        """
        cfg, model = self.config, self.model
        seen: dict[str, dict[str, Tensor]] = {name: {} for name in self.codebooks}

        def keep(act: Tensor, hook: Any) -> None:
            site, _, which = hook.name.rpartition(".")
            seen[site][which] = act

        def cut(act: Tensor, hook: Any) -> Tensor:
            return act.detach()  # without KL nothing downstream learns: keep no graph for it

        hooks: list[tuple[str | Callable[..., Any], Callable[..., Any]]] = []
        for name in self.codebooks:
            hooks += [(f"{name}.hook_codebook_in", keep), (f"{name}.hook_codes", keep)]
            if not cfg.kl_coef:
                hooks.append((f"{name}.hook_codebook_out", cut))
        base_logits = None
        if cfg.kl_coef:
            with torch.no_grad(), codebooks_disabled(model):
                base_logits = model(tokens)
        for cb in self.codebooks.values():
            cb.snap_gradient_terms = False  # the explicit MSE below replaces the built-in term
        try:
            with model.hooks(fwd_hooks=hooks):
                if base_logits is not None:
                    logits = module(tokens)
                else:  # no KL: the forward can stop after the last codebook's block
                    logits = None
                    module(tokens, stop_at_layer=self._stop_layer())
        finally:
            for cb in self.codebooks.values():
                cb.snap_gradient_terms = True
        parts: dict[str, Tensor] = {}
        loss = torch.zeros((), device=self.device)
        for name, cb in self.codebooks.items():
            x, ids = seen[name]["hook_codebook_in"], seen[name]["hook_codes"]
            rows = x.detach().reshape(-1, cb.cfg.n_groups, cb.cfg.d_group)
            flat_ids = ids.reshape(rows.shape[0], cb.cfg.n_groups, ids.shape[-1])
            gathered = gather_mean(flat_ids, cb.codes.to(rows.dtype))
            mse = reconstruction_mse(gathered, rows, cfg.mse_reduction)
            parts[f"mse/{name}"] = mse.detach()
            loss = loss + cfg.mse_coef * mse
        if base_logits is not None and logits is not None:
            kl = F.kl_div(
                F.log_softmax(logits.float(), -1).flatten(0, -2),
                F.log_softmax(base_logits.float(), -1).flatten(0, -2),
                log_target=True,
                reduction="batchmean",
            )
            parts["kl"] = kl.detach()
            loss = loss + cfg.kl_coef * kl
        recent = None
        if keep_rows:
            recent = {n: self._rows(n, s["hook_codebook_in"], tokens) for n, s in seen.items()}
        return loss, parts, recent

    def _stop_layer(self) -> int | None:
        """One past the last block holding a codebook (None: a site after the blocks)."""
        layers = []
        for name in self.codebooks:
            head, _, rest = name.partition(".")
            if head != "blocks":
                return None
            layers.append(int(rest.split(".", 1)[0]))
        if not layers:
            return None
        last = max(layers) + 1
        return None if last >= self.model.cfg.n_layers else last

    def state_tensors(self, skip: set[str]) -> dict[str, Tensor]:
        """The model's weights (joint mode: they train too), without the codebooks' codes."""
        if self.config.mode != "joint":
            return {}
        return {f"model.{k}": v for k, v in self.model.state_dict().items() if k not in skip}

    def load_state_tensors(self, tensors: Mapping[str, Tensor]) -> None:
        if self.config.mode != "joint":
            return
        prefix = "model."
        state = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        self.model.load_state_dict(state, strict=False)


class ActivationInputs:
    """Activation batches given directly: each codebook reads its own rows (no model)."""

    def __init__(self, stack: CodebookStack, config: TrainConfig, device: torch.device):
        self.stack, self.config, self.device = stack, config, device
        self.codebooks = stack.codebooks

    @property
    def module(self) -> nn.Module:
        return self.stack

    def begin(self, is_codebook: Callable[[str], bool]) -> None:
        pass

    def end(self, trained: bool) -> None:
        self.stack.eval()

    def prepare(self, batch: Any) -> Rows:
        names = list(self.codebooks)
        if isinstance(batch, Mapping):
            if set(batch) != set(names):
                raise ValueError(
                    f"Activation batches must map every codebook name to its rows: got keys "
                    f"{sorted(batch)}, the codebooks are {names}."
                )
            named = dict(batch)
        elif len(names) == 1:
            named = {names[0]: batch}
        else:
            raise ValueError(
                f"With {len(names)} codebooks each activation batch must be a mapping of name to "
                f"rows (codebooks: {names}), got a {type(batch).__name__}."
            )
        rows: Rows = {}
        for name, value in named.items():
            cfg = self.codebooks[name].cfg
            x = torch.as_tensor(value)
            shapes = (torch.Size([cfg.d_in]), torch.Size([cfg.n_groups, cfg.d_group]))
            if not x.is_floating_point() or x.ndim < 2 or x.shape[1:] not in shapes:
                raise ValueError(
                    f"Activation rows for {name!r} must be Float[Tensor, 'rows {cfg.d_in}'] (or "
                    f"'rows {cfg.n_groups} {cfg.d_group}'), got dtype {x.dtype} shape "
                    f"{tuple(x.shape)}."
                )
            rows[name] = x.detach().to(self.device).reshape(-1, cfg.n_groups, cfg.d_group)
        sizes = {x.shape[0] for x in rows.values()}
        if len(sizes) != 1 or 0 in sizes:
            raise ValueError(
                "Every codebook's activation rows in a batch must be the same number (> 0) of "
                f"rows, got {[(n, x.shape[0]) for n, x in rows.items()]}."
            )
        return rows

    def shard(self, rows: Rows, dist: DistInfo) -> Rows:
        return {name: shard_batch(x, dist) for name, x in rows.items()}

    def count(self, rows: Rows) -> int:
        return next(iter(rows.values())).shape[0]

    def init_rows(self, batches: list[Rows]) -> Rows:
        return {name: torch.cat([b[name] for b in batches]) for name in self.codebooks}

    def loss(
        self, module: nn.Module, rows: Rows, keep_rows: bool
    ) -> tuple[Tensor, dict[str, Tensor], Rows | None]:
        cfg = self.config
        for cb in self.codebooks.values():
            cb.snap_gradient_terms = False
        try:
            out = module(rows)  # the input needs no gradient: the codes get the MSE's alone
        finally:
            for cb in self.codebooks.values():
                cb.snap_gradient_terms = True
        parts: dict[str, Tensor] = {}
        loss = torch.zeros((), device=self.device)
        for name, x in rows.items():
            mse = reconstruction_mse(out[name], x, cfg.mse_reduction)
            parts[f"mse/{name}"] = mse.detach()
            loss = loss + cfg.mse_coef * mse
        return loss, parts, rows if keep_rows else None

    def state_tensors(self, skip: set[str]) -> dict[str, Tensor]:
        return {}

    def load_state_tensors(self, tensors: Mapping[str, Tensor]) -> None:
        pass


# -- the trainer --------------------------------------------------------------------------------
