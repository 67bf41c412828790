"""`CodebookConfig` and `Codebook`: a vector-quantization bottleneck that is itself a HookPoint.

A `Codebook` replaces a TransformerLens `HookPoint` in a model. Because it *is* a HookPoint, hooks
on the original name keep working (they see the codebook's output), and its three own hook
points (`hook_codebook_in`, `hook_codes`, `hook_codebook_out`) are named `{site}.hook_...` by
`HookedRootModule.setup()`, so `run_with_cache`, `run_with_hooks` and `generate` see codes for free.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from einops import pack, unpack
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from tl_codebook.configs import dataclass_from_dict
from tl_codebook.snap import (
    check_similarity,
    code_scores,
    gather_mean,
    select_codes,
    snap_output,
)


@dataclass
class CodebookConfig:
    """Everything that defines a codebook; saved as JSON next to its weights.

    Defaults follow the paper's training setting (`aeloss`): the codes get the downstream
    gradient plus the reconstruction gradient (`reconstruction_coef=1`), the input gets the pure
    straight-through gradient (`commitment_coef=0`).

    Raises:
        ValueError: on construction, for a size that is not an integer >= 1, `k > num_codes`,
            an unknown `similarity`, a `d_in` that `n_groups` does not divide (the message
            lists the valid `n_groups`), or a negative or non-finite coefficient / `init_std`.
    """

    d_in: int
    """Width of the activation vectors the codebook snaps (the hook point's last axis)."""
    num_codes: int
    """Codes per group: the size of each group's vocabulary of discrete features."""
    k: int = 1
    """Codes chosen per token and group; the output is the mean of those k code vectors."""
    similarity: str = "inner_product"
    """How inputs score against codes: "inner_product", "cosine" or "euclidean" (negative
    distance)."""
    n_groups: int = 1
    """Independent groups the input is split into (`d_in / n_groups` dimensions each), each with
    its own `num_codes` codes and its own top-k."""
    hook_name: str | None = None
    """The hook point the codebook sits at (e.g. "blocks.0.hook_resid_post"), or None standalone."""
    reconstruction_coef: float = 1.0
    """Weight of the gradient that pulls the chosen codes towards their inputs."""
    commitment_coef: float = 0.0
    """Weight of the gradient that pulls the inputs towards their chosen codes (0: pure
    straight-through for the input)."""
    chunk_size: int = 512
    """Tokens scored at once (all groups); the largest temporary is chunk_size x n_groups x
    num_codes floats (1/8 of the full score matrix for 4096 tokens). Smaller chunks save memory
    but cost speed with 2+ threads (more parallel regions); see benchmarks/bench_snap.py."""
    init_std: float = 1.0
    """Std of the Gaussian initial codes (norm ~ init_std*sqrt(d_group)); see `Codebook`."""
    metadata: dict[str, Any] = field(default_factory=dict)
    """Free-form JSON-serialisable notes saved with the codebook (e.g. how it was trained)."""

    def __post_init__(self) -> None:
        for name in ("d_in", "num_codes", "n_groups", "k", "chunk_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"CodebookConfig.{name} must be an integer >= 1, got {value!r}.")
        if self.k > self.num_codes:
            raise ValueError(
                f"CodebookConfig.k={self.k} must be between 1 and num_codes={self.num_codes}."
            )
        check_similarity(self.similarity)
        if self.d_in % self.n_groups:
            divisors = [g for g in range(1, self.d_in + 1) if self.d_in % g == 0]
            raise ValueError(
                f"CodebookConfig.d_in={self.d_in} is not divisible by n_groups={self.n_groups}; "
                f"valid n_groups for this d_in: {divisors[:12]}{' ...' if len(divisors) > 12 else ''}."
            )
        for name in ("reconstruction_coef", "commitment_coef", "init_std"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"CodebookConfig.{name} must be finite and >= 0, got {value!r}.")

    @property
    def d_group(self) -> int:
        """Dimensions per group: `d_in // n_groups` (the width of each code vector)."""
        return self.d_in // self.n_groups

    def to_dict(self) -> dict[str, Any]:
        """The config as a plain JSON-serialisable dict (the inverse of `from_dict`)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CodebookConfig:
        """Build a config from a dict, refusing missing required keys and unknown keys.

        Raises:
            ValueError: for a non-dict, an unknown key (with the closest valid one), a missing
                `d_in` / `num_codes`, a value of the wrong type, or any check of the config.
        """
        return dataclass_from_dict(cls, data)


STATS_DTYPES = {
    "code_hits": torch.long,
    "tokens_seen": torch.long,
    "squared_error_sum": torch.float64,
}
"""The statistics buffers and the dtypes they keep whatever the module is cast to."""


class Codebook(HookPoint):
    """k-sparse, discrete bottleneck: each input vector becomes the mean of its k best codes.

    Use it standalone (`cb(x)`, `cb.encode(x)`, `cb.decode(ids)`) or put it in a model at
    `cfg.hook_name` with `HookedCodebookTransformer.add_codebook` / `attach_codebook`.

    Initialisation: codes are i.i.d. N(0, init_std^2), like `nn.Embedding` and the reference
    implementation. With unit std a code's norm is about sqrt(d_group), the scale of a
    LayerNorm-ed activation, which is what joint training from scratch sees. Activations of
    another scale (a frozen pretrained residual stream) train far better from a data-driven
    start: call `init_from_activations` (random real inputs) or the trainer's k-means init.

    Statistics (`code_hits`, `dead_codes`, `mean_squared_error`) are non-persistent buffers,
    updated on every forward and cleared by `reset_stats()`.

    Shapes: the parameter `codes` is `[n_groups, num_codes, d_group]`. Inputs are
    `[..., d_in]` (or `[..., n_groups, d_group]`) with any leading axes (usually batch and
    position); code ids are integer tensors `[..., n_groups, k]`.

    Args:
        cfg: the codebook's sizes and training coefficients (checked when it is built).
    """

    code_hits: Tensor
    tokens_seen: Tensor
    squared_error_sum: Tensor

    def __init__(self, cfg: CodebookConfig):
        super().__init__()
        self.cfg = cfg
        codes = torch.randn(cfg.n_groups, cfg.num_codes, cfg.d_group) * cfg.init_std
        self.codes = nn.Parameter(codes)
        self.hook_codebook_in = HookPoint()
        self.hook_codes = HookPoint()
        self.hook_codebook_out = HookPoint()
        self.register_buffer(
            "code_hits",
            torch.zeros(cfg.n_groups, cfg.num_codes, dtype=STATS_DTYPES["code_hits"]),
            persistent=False,
        )
        self.register_buffer(
            "tokens_seen", torch.zeros((), dtype=STATS_DTYPES["tokens_seen"]), persistent=False
        )
        self.register_buffer(
            "squared_error_sum",
            torch.zeros((), dtype=STATS_DTYPES["squared_error_sum"]),
            persistent=False,
        )
        self.enabled = True
        self.track_stats = True
        self.snap_gradient_terms = True
        """False drops the config's reconstruction/commitment gradient terms (pure straight-through);
        frozen-mode training sets it, because it optimises an explicit reconstruction loss instead."""
        self.ablated: Bool[Tensor, "n_groups num_codes"] | None = None

    # -- shapes -----------------------------------------------------------------------------

    def _grouped(self, x: Tensor) -> tuple[Tensor, list]:
        """Flatten `[..., d_in]` or `[..., n_groups, d_group]` to `[rows, n_groups, d_group]`."""
        cfg = self.cfg
        # reshape, not einops.pack: pack copies the input (torch.cat) even when a view would do.
        if x.shape[-1] == cfg.d_in:
            return x.reshape(-1, cfg.n_groups, cfg.d_group), []
        if x.ndim >= 2 and cfg.n_groups > 1 and tuple(x.shape[-2:]) == (cfg.n_groups, cfg.d_group):
            return x.reshape(-1, cfg.n_groups, cfg.d_group), []
        accepted = f"[..., {cfg.d_in}]"
        if cfg.n_groups > 1:
            accepted += f" or [..., {cfg.n_groups}, {cfg.d_group}]"
        where = f" at {cfg.hook_name!r}" if cfg.hook_name else ""
        raise ValueError(
            f"Codebook{where} expects input of shape {accepted}, got {tuple(x.shape)}."
        )

    def _lead_shape(self, x: Tensor) -> tuple[int, ...]:
        if x.shape[-1] == self.cfg.d_in:
            return tuple(x.shape[:-1])
        return tuple(x.shape[:-2])

    def check_ids(self, ids: Tensor) -> None:
        """Check that `ids` are valid code ids of shape `[..., n_groups, k']` (any k' >= 0).

        Raises:
            TypeError: if `ids` is a float or bool tensor.
            ValueError: if its second-to-last axis is not `n_groups`, or an id lies outside
                `[0, num_codes)`.
        """
        if ids.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.bool):
            raise TypeError(f"Code ids must be an integer tensor, got dtype {ids.dtype}.")
        if ids.ndim < 2 or ids.shape[-2] != self.cfg.n_groups:
            raise ValueError(
                f"Code ids must have shape [..., n_groups={self.cfg.n_groups}, k], got {tuple(ids.shape)}."
            )
        if ids.numel():
            low, high = torch.stack(torch.aminmax(ids)).tolist()  # one host sync
            if low < 0 or high >= self.cfg.num_codes:
                raise ValueError(
                    f"Code ids must lie in [0, {self.cfg.num_codes}); got values from {low} to {high}."
                )

    # -- the public three -------------------------------------------------------------------

    def encode(self, x: Float[Tensor, "..."]) -> Int[Tensor, "... n_groups k"]:
        """Top-k code ids per group, best first (ablated codes are never chosen).

        Does not run the hook points or update the statistics.

        Args:
            x: activations `[..., d_in]` (or `[..., n_groups, d_group]`).

        Returns:
            Integer code ids `[..., n_groups, k]` (the leading axes of `x`).

        Raises:
            ValueError: if the last axis of `x` is neither `d_in` nor `[n_groups, d_group]`.
        """
        rows, _ = self._grouped(x)
        ids = select_codes(
            rows, self.codes, self.cfg.k, self.cfg.similarity, self.cfg.chunk_size, self.ablated
        )
        return ids.view(*self._lead_shape(x), self.cfg.n_groups, self.cfg.k)

    def decode(self, ids: Int[Tensor, "... n_groups k"]) -> Float[Tensor, "... d_in"]:
        """Per group, the mean of the chosen code vectors, concatenated to `[..., d_in]`.

        Args:
            ids: integer code ids `[..., n_groups, k]` (any k >= 1, e.g. from `encode`).

        Returns:
            Vectors `[..., d_in]`, the leading axes of `ids`.

        Raises:
            TypeError: if `ids` is not an integer tensor.
            ValueError: for a wrong group axis or an id outside `[0, num_codes)`.
        """
        self.check_ids(ids)
        flat, ps = pack([ids], "* g k")
        out = gather_mean(flat, self.codes).reshape(flat.shape[0], self.cfg.d_in)
        [out] = unpack(out, ps, "* d")
        return out

    def forward(self, x: Float[Tensor, "..."]) -> Float[Tensor, "..."]:
        """Snap `x` (same shape out), running the three hook points along the way.

        A token whose input holds a NaN or inf comes out all NaN (NaN in, NaN out), so a broken
        activation is never hidden behind a code; its ids in `hook_codes` are meaningless.
        With `enabled` False the input passes through unchanged (no hooks run).

        Args:
            x: activations `[..., d_in]` (or `[..., n_groups, d_group]`).

        Returns:
            The snapped activations, shape of `x`: per token and group the mean of its k codes.

        Raises:
            ValueError: for an input of the wrong width, or if a hook on `hook_codes` returns
                ids outside `[0, num_codes)` or of the wrong group axis (TypeError for float
                ids).
        """
        if not self.enabled:
            return x
        x = self.hook_codebook_in(x)
        rows, _ = self._grouped(x)
        lead = self._lead_shape(x)
        ids = select_codes(
            rows, self.codes, self.cfg.k, self.cfg.similarity, self.cfg.chunk_size, self.ablated
        )
        ids = self.hook_codes(ids.view(*lead, self.cfg.n_groups, self.cfg.k))
        if self.hook_codes.fwd_hooks:  # only a hook can have changed them; checking syncs on GPU
            self.check_ids(ids)
        flat_ids = ids.reshape(rows.shape[0], self.cfg.n_groups, ids.shape[-1])
        terms = self.snap_gradient_terms
        out = snap_output(
            rows,
            flat_ids,
            self.codes.to(x.dtype),
            self.cfg.commitment_coef if terms else 0.0,
            self.cfg.reconstruction_coef if terms else 0.0,
        )
        if self.track_stats:
            self._update_stats(rows, out, flat_ids)
        return self.hook_codebook_out(out.view(x.shape))

    def scores(self, x: Float[Tensor, "..."]) -> Float[Tensor, "... n_groups num_codes"]:
        """The similarity of `x` to every code (materialises tokens x codes: for small inputs).

        Args:
            x: activations `[..., d_in]` (or `[..., n_groups, d_group]`).

        Returns:
            Scores `[..., n_groups, num_codes]`, higher is closer (negative distance for
                "euclidean").

        Raises:
            ValueError: if the last axis of `x` is neither `d_in` nor `[n_groups, d_group]`.
        """
        rows, _ = self._grouped(x)
        return code_scores(rows, self.codes, self.cfg.similarity).view(
            *self._lead_shape(x), self.cfg.n_groups, self.cfg.num_codes
        )

    # -- statistics ---------------------------------------------------------------------------

    @torch.no_grad()
    def _update_stats(self, rows: Tensor, quantized: Tensor, ids: Tensor) -> None:
        groups, num_codes = self.cfg.n_groups, self.cfg.num_codes
        offsets = torch.arange(groups, device=ids.device).mul_(num_codes).view(1, groups, 1)
        hits = torch.bincount((ids + offsets).flatten(), minlength=groups * num_codes)
        self.code_hits += hits.view(groups, num_codes)
        self.tokens_seen += rows.shape[0]
        # in float64 from the start: a half-precision sum of squares overflows
        error = torch.linalg.vector_norm(
            torch.sub(quantized.detach(), rows.detach()), dtype=torch.float64
        )
        self.squared_error_sum += error.square()

    def _apply(self, fn: Any, recurse: bool = True) -> Codebook:
        """`.to()`, `.half()`, `.cuda()`, ...: the statistics move device but keep their dtypes
        (a float64 error sum turned fp16 overflows; hit counts stay integers)."""
        stats = {name: getattr(self, name) for name in STATS_DTYPES}
        super()._apply(fn, recurse)
        for name, before in stats.items():
            moved = getattr(self, name)
            setattr(self, name, before.to(device=moved.device, dtype=STATS_DTYPES[name]))
        return self

    def reset_stats(self) -> None:
        """Zero the hit counts, the token count and the squared-error sum."""
        self.code_hits.zero_()
        self.tokens_seen.zero_()
        self.squared_error_sum.zero_()

    @property
    def dead_codes(self) -> int:
        """Codes not chosen once since the last `reset_stats()` (summed over groups)."""
        return int((self.code_hits == 0).sum())

    @property
    def dead_fraction(self) -> float:
        """The fraction of all codes (over groups) not chosen once since the last reset."""
        return self.dead_codes / self.code_hits.numel()

    @property
    def mean_squared_error(self) -> float:
        """Mean over tokens and dimensions of (output - input)^2 since the last reset."""
        n = int(self.tokens_seen) * self.cfg.d_in
        return float(self.squared_error_sum) / n if n else float("nan")

    # -- initialisation and io ---------------------------------------------------------------

    @torch.no_grad()
    def init_from_activations(
        self, x: Float[Tensor, "..."], generator: torch.Generator | None = None
    ) -> None:
        """Set every code to a randomly chosen real input (per group), a start that trains well.

        Inputs are drawn without replacement when there are at least `num_codes` rows, with
        replacement otherwise.

        Args:
            x: activations `[..., d_in]` (or `[..., n_groups, d_group]`), any number of rows.
            generator: a CPU generator for a reproducible draw.

        Raises:
            ValueError: if the last axis of `x` is neither `d_in` nor `[n_groups, d_group]`.
        """
        rows, _ = self._grouped(x)
        n = rows.shape[0]
        idx = torch.randint(n, (self.cfg.num_codes,), generator=generator, device="cpu")
        if n >= self.cfg.num_codes:
            idx = torch.randperm(n, generator=generator)[: self.cfg.num_codes]
        self.codes.copy_(rows[idx.to(rows.device)].transpose(0, 1).to(self.codes.dtype))

    def save(self, path: str | Path) -> None:
        """Save to the directory `path` (`cfg.json` + `codebook.safetensors`); see `save_codebook`.

        Raises:
            ValueError: if `path` exists and is a file, or a directory holding other files.
        """
        from tl_codebook.io import save_codebook

        save_codebook(self, path)

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device | None = None) -> Codebook:
        """Load a codebook saved by `save`, its codes on `device` (default CPU).

        Raises:
            CodebookFileError: for a missing, corrupted or mismatched file (see `load_codebook`).
            ValueError: for a saved config that fails `CodebookConfig`'s checks.
        """
        from tl_codebook.io import load_codebook

        return load_codebook(path, device=device)

    def to_sae(self):  # noqa: ANN201 - returns a sae_lens SAE; imported lazily
        """This codebook as a SAELens SAE of architecture "codebook" (identical reconstructions)."""
        from tl_codebook.comparisons.saelens import codebook_to_sae

        return codebook_to_sae(self)

    def extra_repr(self) -> str:
        """The config's main fields, shown in `print(model)`."""
        c = self.cfg
        return (
            f"hook_name={c.hook_name!r}, d_in={c.d_in}, num_codes={c.num_codes}, k={c.k}, "
            f"similarity={c.similarity!r}, n_groups={c.n_groups}"
        )

    def __repr__(self) -> str:  # HookPoint overrides __repr__; restore nn.Module's
        return nn.Module.__repr__(self)
