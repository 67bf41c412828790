"""Acting on codes: force codes on, ablate codes, as hook functions and context managers.

Forcing is a hook on `{site}.hook_codes` that rewrites the chosen ids; ablation masks codes out
of the top-k selection itself (score -inf), so the next best codes are chosen. Both live in the
model's ordinary hook/module state, so they hold through `generate`, `run_with_cache`, ...
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Bool, Int
from torch import Tensor
from transformer_lens.hook_points import HookPoint

from tl_codebook.codebook import Codebook
from tl_codebook.hooks.model import codebooks_of, unknown_hook_error

CodeSpec = Sequence[int] | Mapping[int, Sequence[int]]
"""Code ids for every group (a list), or per group ({group_index: [ids]}). Public functions take
`Any` where a CodeSpec goes and check it themselves, so a wrong value gets our error message."""

POSITIONS_MEANING = (
    "`positions` are absolute token positions in the whole sequence (prompt and generated "
    "tokens); a negative position counts back from the end of the input given to forward, "
    "run_with_cache or generate (-1 is the input's last token) and is resolved once per input, "
    "so the same positions are forced with and without the KV cache; None means every position, "
    "and range(len(prompt) - 1, model.cfg.n_ctx) the prompt's last token and every generated "
    "token, so that each new token is predicted from a forced position."
)


def _integer(value: Any, what: str) -> int:
    """`value` as an int; bools, floats and strings are refused rather than silently converted."""
    if isinstance(value, (bool, str, bytes, float)):
        raise TypeError(f"{what} must be integers, got {value!r}.")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{what} must be integers, got {value!r}.") from None


def _per_group(spec: Any, codebook: Codebook, what: str) -> dict[int, list[int]]:
    """Normalise a CodeSpec to {group: [ids]}, checking every id and group index."""
    cfg = codebook.cfg
    if isinstance(spec, (str, bytes)) or not isinstance(spec, (Mapping, Iterable)):
        spec = [spec]
    if isinstance(spec, Mapping):
        groups = {
            _integer(g, "groups"): [_integer(c, "code ids") for c in ids] for g, ids in spec.items()
        }
    else:
        ids = [_integer(c, "code ids") for c in spec]
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


def check_positions(positions: Any, n_ctx: int | None = None) -> list[int] | None:
    """`positions` as a list of ints (a bare int is one position), refusing non-integers and,
    given the model's context length, positions that can never lie inside it."""
    if positions is None:
        return None
    if isinstance(positions, (str, bytes)) or not isinstance(positions, Iterable):
        positions = [positions]
    checked = [_integer(p, "positions") for p in positions]
    if n_ctx is not None:
        for p in checked:
            if not -n_ctx <= p < n_ctx:
                raise ValueError(
                    f"force_codes: position {p} can never lie inside the context (n_ctx={n_ctx}); "
                    f"valid positions are {-n_ctx}..{n_ctx - 1}."
                )
    return checked


def _resolve(model: torch.nn.Module, codes: Mapping[str, Any]) -> dict[str, Codebook]:
    present = codebooks_of(model)
    for name in codes:
        if name not in present:
            raise unknown_hook_error(name, present, what="codebook")
    return {name: present[name] for name in codes}


SteeringSpec = dict[str, dict[int, list[int]]]
"""What `force_codes` takes, in its explicit form: codebook site -> {group: [code ids]}."""


def random_codes_like(
    spec: SteeringSpec, model: torch.nn.Module, generator: torch.Generator
) -> SteeringSpec:
    """The same (site, group) slots as `spec`, each with as many uniformly random other codes:
    the control that tells whether *which* code is forced matters, or only that one is.

    Raises:
        UnknownHookError: for a site of `spec` with no codebook on `model`.
    """
    codebooks = _resolve(model, spec)
    out: SteeringSpec = {}
    for site, groups in spec.items():
        num_codes = codebooks[site].cfg.num_codes
        out[site] = {}
        for group, codes in groups.items():
            drawn = torch.randperm(num_codes, generator=generator).tolist()
            out[site][group] = [c for c in drawn if c not in codes][: len(codes)]
    return out


def insert_codes(ids: Int[Tensor, "... k"], forced: Int[Tensor, " f"]) -> Int[Tensor, "... k"]:
    """Make `forced` codes active: they take the first slots, and the natural codes keep their
    rank order in the remaining slots, so the lowest-ranked natural codes are the ones dropped.

    Keeping the strongest natural codes changes the model's own computation as little as
    possible while guaranteeing the forced codes are on; with k = 1 it is plain replacement.
    A forced code that was already active is not duplicated.

    Args:
        ids: the chosen code ids of one group, `[..., k]`, best first.
        forced: the `f <= k` distinct code ids to force on, `[f]`.

    Returns:
        New ids `[..., k]`: the forced ids first, then the best `k - f` natural ones.
    """
    k, f = ids.shape[-1], forced.shape[0]
    is_forced = torch.isin(ids, forced)
    order = torch.argsort(is_forced.to(torch.int8), dim=-1, stable=True)
    natural = torch.gather(ids, -1, order)[..., : k - f]
    return torch.cat([forced.expand(*ids.shape[:-1], f), natural], dim=-1)


@dataclass
class SequenceWindow:
    """Where the tokens of the current forward sit in their sequence.

    `start`: how many tokens of the sequence are already in the KV cache (0 without one).
    `input_length`: the length of the input negative positions count back from; None until the
    first codebook of a new input sees it. `generating`: inside a `generate` call, whose forwards
    all continue its prompt (with the cache one new token each, without it the whole sequence).
    """

    start: int = 0
    input_length: int | None = None
    generating: bool = False

    def begin_forward(self, cached: int) -> None:
        """Called before each forward's first block with the KV cache's length."""
        self.start = cached
        if cached == 0 and not (self.generating and self.input_length is not None):
            self.input_length = None  # a new input; its length is read at the first codebook

    def mask(
        self, n_pos: int, positions: Sequence[int], device: torch.device
    ) -> Bool[Tensor, " pos"]:
        """Which of this forward's `n_pos` positions are among the absolute `positions`."""
        if self.input_length is None:
            self.input_length = self.start + n_pos
        absolute = {p if p >= 0 else self.input_length + p for p in positions}
        mask = torch.zeros(n_pos, dtype=torch.bool)  # built on the host, moved once
        for p in absolute:
            if self.start <= p < self.start + n_pos:
                mask[p - self.start] = True
        return mask.to(device, non_blocking=True)


def _cache_length(entry: Any) -> int:
    """Tokens already held by a TransformerLens KV cache entry (0 for none or an empty one)."""
    keys = getattr(entry, "past_keys", None)
    return 0 if keys is None else int(keys.shape[1])


@contextmanager
def _tracking_window(model: torch.nn.Module, window: SequenceWindow) -> Iterator[None]:
    """Keep `window` up to date on `model` for the block (any HookedTransformer).

    A forward pre-hook on every block reads its KV cache entry (TransformerLens' generate calls
    `model.forward` directly, so a hook on the model itself would miss it), and `generate` /
    `generate_stream` are wrapped for the block to mark where each generation's prompt begins.
    Both are removed on exit.
    """

    def before_block(module: torch.nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
        window.begin_forward(_cache_length(kwargs.get("past_kv_cache_entry")))

    blocks = getattr(model, "blocks", None)
    handles = [
        block.register_forward_pre_hook(before_block, with_kwargs=True) for block in blocks or []
    ]

    def begin(active: bool) -> None:
        window.generating, window.input_length = active, None

    def generate(original: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            begin(True)
            try:
                return original(*args, **kwargs)
            finally:
                begin(False)

        return wrapper

    def generate_stream(original: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Iterator[Any]:
            begin(True)
            try:
                yield from original(*args, **kwargs)
            finally:
                begin(False)

        return wrapper

    wrapped: dict[str, Any] = {}  # name -> what the instance held before (None: nothing)
    for name, wrap in (("generate", generate), ("generate_stream", generate_stream)):
        original = getattr(model, name, None)
        if original is not None:
            wrapped[name] = model.__dict__.get(name)
            object.__setattr__(model, name, wrap(original))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        for name, previous in wrapped.items():
            if previous is None:
                model.__dict__.pop(name, None)
            else:
                object.__setattr__(model, name, previous)


def force_codes_hook(
    codebook: Codebook,
    codes: Any,
    positions: int | Iterable[Any] | None = None,
    window: SequenceWindow | None = None,
) -> Callable[[Tensor, HookPoint], Tensor]:
    """A hook for `{site}.hook_codes` that forces `codes` on (see `insert_codes`).

    Positions: see `POSITIONS_MEANING`. `window` tells where each forward's tokens sit in the
    sequence (`force_codes` keeps it up to date); without one, every forward is a whole input.
    Use it with `model.hooks(fwd_hooks=[(f"{site}.hook_codes", hook)])` or `run_with_hooks`
    when `force_codes` (a context manager) does not fit.

    Args:
        codebook: the codebook whose ids the hook rewrites (for checking `codes`).
        codes: code ids for every group (an int or a list), or `{group: [ids]}`.
        positions: which positions to force; None for all.
        window: the sequence window shared by one `force_codes` block.

    Returns:
        A hook `(ids, hook) -> ids` on `[..., pos, n_groups, k]` integer ids.

    Raises:
        TypeError: for non-integer code ids, groups or positions (bools, floats, strings).
        ValueError: for a group that does not exist, an id outside `[0, num_codes)`, repeated
            ids, or more than `k` codes in one group.
    """
    per_group = _per_group(codes, codebook, "force_codes")
    too_many = {g: ids for g, ids in per_group.items() if len(ids) > codebook.cfg.k}
    if too_many:
        raise ValueError(
            f"force_codes at {codebook.cfg.hook_name!r}: cannot force {too_many} with k={codebook.cfg.k}; "
            "at most k codes can be active per group."
        )
    pos = check_positions(positions)
    own_window = window is None

    def hook(ids: Tensor, hook: HookPoint) -> Tensor:
        # ids: [..., pos, n_groups, k]
        mask = None
        if pos is not None:
            where = SequenceWindow() if own_window else window
            assert where is not None
            mask = where.mask(ids.shape[-3], pos, ids.device)
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
    codes: Mapping[str, Any],
    positions: int | Iterable[Any] | None = None,
) -> Iterator[None]:
    """Inside the block, the given codes are active at `positions` of each codebook site.

    `codes` maps a codebook's hook name to code ids (for every group) or {group: [ids]}.
    `positions` are absolute token positions in the whole sequence (prompt and generated
    tokens); a negative position counts back from the end of the input given to forward,
    run_with_cache or generate (-1 is the input's last token) and is resolved once per input,
    so generating with and without the KV cache forces the same positions. None means every
    position; `range(len(prompt) - 1, model.cfg.n_ctx)` the prompt's last token and every
    generated token (each new token is then predicted from a forced position); a bare int one
    position. Positions that can never lie inside `n_ctx`, and non-integer positions or ids,
    are refused. Works on any HookedTransformer (HookedSAETransformer, ...) with codebooks.

    At most `k` codes per group can be forced; a forced code takes one of the token's k slots
    and the strongest natural codes keep the rest (see `insert_codes`).

    Raises:
        UnknownHookError: for a site in `codes` with no codebook.
        TypeError: for non-integer code ids, groups or positions.
        ValueError: for a group that does not exist, an id outside `[0, num_codes)`, repeated
            ids, more than `k` codes in one group, or a position outside `-n_ctx..n_ctx - 1`.

    All are raised on entering the block, before any hook is added.
    """
    chosen = _resolve(model, codes)
    cfg = getattr(model, "cfg", None)
    pos = check_positions(positions, getattr(cfg, "n_ctx", None))
    window = SequenceWindow()
    hooks = [
        (f"{name}.hook_codes", force_codes_hook(cb, codes[name], pos, window))
        for name, cb in chosen.items()
    ]
    with model.hooks(fwd_hooks=hooks), _tracking_window(model, window):  # type: ignore[operator]
        yield


@contextmanager
def ablate_codes(model: torch.nn.Module, codes: Mapping[str, Any]) -> Iterator[None]:
    """Inside the block, the given codes can never be chosen; each token gets the next best.

    `codes` maps a codebook's hook name to code ids (for every group) or `{group: [ids]}`.
    Ablation masks the codes out of the top-k selection itself (their score is -inf), so it
    also holds through `generate` and `run_with_cache`; nested blocks add up, and each
    codebook's previous mask is restored on exit.

    Raises:
        UnknownHookError: for a site in `codes` with no codebook.
        TypeError: for non-integer code ids or groups.
        ValueError: for a group that does not exist, an id outside `[0, num_codes)`, repeated
            ids, or ablating so many codes that fewer than `k` are left in a group.
    """
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
