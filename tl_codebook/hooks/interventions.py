"""Acting on codes: force codes on, ablate codes, as hook functions and context managers.

Forcing is a hook on `{site}.hook_codes` that rewrites the chosen ids; ablation masks codes out
of the top-k selection itself (score -inf), so the next best codes are chosen. Both live in the
model's ordinary hook/module state, so they hold through `generate`, `run_with_cache`, ...
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor
from transformer_lens.hook_points import HookPoint

from tl_codebook.codebook import Codebook
from tl_codebook.hooks.model import codebooks_of, unknown_hook_error

CodeSpec = Sequence[int] | Mapping[int, Sequence[int]]
"""Code ids for every group (a list), or per group ({group_index: [ids]})."""


def _per_group(spec: Any, codebook: Codebook, what: str) -> dict[int, list[int]]:
    """Normalise a CodeSpec to {group: [ids]}, checking every id and group index."""
    cfg = codebook.cfg
    if isinstance(spec, int):
        spec = [spec]
    if isinstance(spec, Mapping):
        groups = {int(g): [int(c) for c in ids] for g, ids in spec.items()}
    else:
        ids = [int(c) for c in spec]
        groups = {g: ids for g in range(cfg.n_groups)}
    for g, ids in groups.items():
        if not 0 <= g < cfg.n_groups:
            raise ValueError(
                f"{what} at {cfg.hook_name!r}: group {g} does not exist (valid: 0..{cfg.n_groups - 1})."
            )
        bad = [c for c in ids if not 0 <= c < cfg.num_codes]
        if bad:
            raise ValueError(
                f"{what} at {cfg.hook_name!r}: code id(s) {bad} out of range; valid ids are "
                f"0..{cfg.num_codes - 1} (num_codes={cfg.num_codes})."
            )
        if len(set(ids)) != len(ids):
            raise ValueError(f"{what} at {cfg.hook_name!r}: repeated code ids in {ids}.")
    return groups


def _resolve(model: torch.nn.Module, codes: Mapping[str, Any]) -> dict[str, Codebook]:
    present = codebooks_of(model)
    for name in codes:
        if name not in present:
            raise unknown_hook_error(name, present, what="codebook")
    return {name: present[name] for name in codes}


def insert_codes(ids: Int[Tensor, "... k"], forced: Int[Tensor, " f"]) -> Int[Tensor, "... k"]:
    """Make `forced` codes active: they take the first slots, and the natural codes keep their
    rank order in the remaining slots, so the lowest-ranked natural codes are the ones dropped.

    Keeping the strongest natural codes changes the model's own computation as little as
    possible while guaranteeing the forced codes are on; with k = 1 it is plain replacement.
    A forced code that was already active is not duplicated.
    """
    k, f = ids.shape[-1], forced.shape[0]
    is_forced = torch.isin(ids, forced)
    order = torch.argsort(is_forced.to(torch.int8), dim=-1, stable=True)
    natural = torch.gather(ids, -1, order)[..., : k - f]
    return torch.cat([forced.expand(*ids.shape[:-1], f), natural], dim=-1)


def _window_mask(
    n_pos: int, positions: Sequence[int] | None, offset: int, device: torch.device
) -> Tensor | None:
    """Boolean mask over the current window's positions, from absolute (or negative) positions."""
    if positions is None:
        return None
    total = offset + n_pos
    absolute = {p if p >= 0 else total + p for p in positions}
    mask = torch.zeros(n_pos, dtype=torch.bool, device=device)
    for p in absolute:
        if offset <= p < total:
            mask[p - offset] = True
    return mask


def force_codes_hook(
    codebook: Codebook,
    codes: CodeSpec,
    positions: Iterable[int] | None = None,
    position_offset: Callable[[], int] = lambda: 0,
) -> Callable[[Tensor, HookPoint], Tensor]:
    """A hook for `{site}.hook_codes` that forces `codes` on (see `insert_codes`).

    `positions` are absolute token positions (negative ones count from the end of the sequence
    so far, so -1 is the newest token, also while generating with a KV cache); None means all.
    `position_offset` tells where the current forward's window starts (0 without a KV cache).
    """
    per_group = _per_group(codes, codebook, "force_codes")
    too_many = {g: ids for g, ids in per_group.items() if len(ids) > codebook.cfg.k}
    if too_many:
        raise ValueError(
            f"force_codes at {codebook.cfg.hook_name!r}: cannot force {too_many} with k={codebook.cfg.k}; "
            "at most k codes can be active per group."
        )
    pos = None if positions is None else [int(p) for p in positions]

    def hook(ids: Tensor, hook: HookPoint) -> Tensor:
        # ids: [..., pos, n_groups, k]
        mask = _window_mask(ids.shape[-3], pos, position_offset(), ids.device)
        out = ids.clone()
        for g, forced in per_group.items():
            if not forced:
                continue
            forced_t = torch.tensor(forced, dtype=ids.dtype, device=ids.device)
            new = insert_codes(ids[..., g, :], forced_t)
            if mask is None:
                out[..., g, :] = new
            else:
                out[..., mask, g, :] = new[..., mask, :]
        return out

    return hook


@contextmanager
def force_codes(
    model: torch.nn.Module,
    codes: Mapping[str, CodeSpec],
    positions: Iterable[int] | None = None,
) -> Iterator[None]:
    """Inside the block, the given codes are active at `positions` of each codebook site.

    `codes` maps a codebook's hook name to code ids (for every group) or {group: [ids]}.
    Works with `generate`: positions are absolute, -1 is the newest token.
    """
    chosen = _resolve(model, codes)
    offset_of = lambda: int(getattr(model, "_position_offset", 0))  # noqa: E731
    pos = None if positions is None else list(positions)
    hooks = [
        (f"{name}.hook_codes", force_codes_hook(cb, codes[name], pos, offset_of))
        for name, cb in chosen.items()
    ]
    with model.hooks(fwd_hooks=hooks):  # type: ignore[operator]
        yield


@contextmanager
def ablate_codes(model: torch.nn.Module, codes: Mapping[str, CodeSpec]) -> Iterator[None]:
    """Inside the block, the given codes can never be chosen; each token gets the next best."""
    chosen = _resolve(model, codes)
    previous = {name: cb.ablated for name, cb in chosen.items()}
    try:
        for name, cb in chosen.items():
            mask = torch.zeros(
                cb.cfg.n_groups, cb.cfg.num_codes, dtype=torch.bool, device=cb.codes.device
            )
            for g, ids in _per_group(codes[name], cb, "ablate_codes").items():
                mask[g, ids] = True
            if int(mask.sum(-1).max()) > cb.cfg.num_codes - cb.cfg.k:
                raise ValueError(
                    f"ablate_codes at {name!r}: ablating {int(mask.sum(-1).max())} codes leaves fewer "
                    f"than k={cb.cfg.k} of {cb.cfg.num_codes} to choose from."
                )
            cb.ablated = mask if cb.ablated is None else cb.ablated | mask
        yield
    finally:
        for name, cb in chosen.items():
            cb.ablated = previous[name]
