"""Putting codebooks into TransformerLens models: attach/detach on any HookedRootModule, and
`HookedCodebookTransformer`, a HookedTransformer that owns codebooks at its hook points.

A codebook replaces the `HookPoint` at its site (it is a HookPoint itself), then `setup()` is
re-run so the model's hook dictionary names the codebook's own hook points. No parallel
mechanism: caching, patching and generation go through TransformerLens' hooks.
"""

from __future__ import annotations

import copy
import difflib
import inspect
import types
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import torch
from transformer_lens import HookedTransformer
from transformer_lens.hook_points import HookPoint
from transformer_lens.HookedRootModule import HookedRootModule
from transformer_lens.utilities.slice import Slice

from tl_codebook.codebook import Codebook

CODEBOOK_HOOK_SUFFIXES = ("hook_codebook_in", "hook_codes", "hook_codebook_out")
_ORIGINALS_ATTR = "_tl_codebook_original_hook_points"


class UnknownHookError(ValueError):
    """A hook name that the model does not have; the message lists the closest valid names.

    A `ValueError`, raised by everything that takes a hook or codebook site name (attaching,
    detaching, interventions, ...) so a typo is reported with what was probably meant.
    """


def unknown_hook_error(
    name: str, valid: Iterable[str], what: str = "hook point"
) -> UnknownHookError:
    valid = list(valid)
    close = difflib.get_close_matches(name, valid, n=5, cutoff=0.5)
    if not close:  # fall back to names sharing the last component (e.g. all hook_mlp_out)
        tail = name.rsplit(".", 1)[-1]
        close = [v for v in valid if v.endswith(tail)][:5]
    hint = f" Closest valid names: {', '.join(close)}." if close else ""
    return UnknownHookError(f"The model has no {what} named {name!r}.{hint}")


def codebooks_of(model: torch.nn.Module) -> dict[str, Codebook]:
    """Every codebook in `model`, keyed by the hook name it sits at.

    Works on any `torch.nn.Module` (an empty dict when it has none); the order is the model's
    module order.
    """
    return {name: m for name, m in model.named_modules() if isinstance(m, Codebook)}


def _parent_and_attr(model: torch.nn.Module, name: str) -> tuple[torch.nn.Module, str]:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    return parent, attr


class _ProbeDone(Exception):
    pass


def probe_activation_shape(model: HookedTransformer, hook_name: str) -> tuple[int, ...]:
    """Shape of the activation at `hook_name` on a one-token input (the forward stops there).

    Only the probe's own hook is removed afterwards (`model.hooks` removes the hooks of its own
    context level), so the user's hooks and active interventions stay in place.
    """
    seen: list[tuple[int, ...]] = []

    def record(act: torch.Tensor, hook: HookPoint) -> None:
        seen.append(tuple(act.shape))
        raise _ProbeDone

    tokens = torch.zeros(1, 1, dtype=torch.long, device=model.cfg.device)
    try:
        with torch.no_grad(), model.hooks(fwd_hooks=[(hook_name, record)]):
            model(tokens, return_type=None)
    except _ProbeDone:
        pass
    if not seen:
        raise ValueError(
            f"The hook point {hook_name!r} is not reached by the model's forward pass."
        )
    return seen[0]


_TL_HEAD_SUFFIXES = ("hook_q", "hook_k", "hook_v", "hook_z", "hook_result")
"""TransformerLens' own rule (HookedRootModule.get_caching_hooks): these names have their
position axis third from last ([batch, pos, head, d]), every other name second from last."""


def codebook_position_axes(model: torch.nn.Module) -> dict[str, int]:
    """The codebook hook points whose position axis is not where TransformerLens' name rule puts
    it (second from last): `hook_codes` ([..., pos, n_groups, k]) always, and the input/output of
    a codebook at a per-head site ([..., pos, head, d_head]); name -> axis from the end."""
    axes: dict[str, int] = {}
    for site in codebooks_of(model):
        axes[f"{site}.hook_codes"] = -3
        if site.endswith(_TL_HEAD_SUFFIXES):
            axes[f"{site}.hook_codebook_in"] = axes[f"{site}.hook_codebook_out"] = -3
    return axes


_CACHING_SIGNATURE = inspect.signature(HookedRootModule.get_caching_hooks)


def _codebook_caching_hooks(
    model: torch.nn.Module, base: Any, *args: Any, **kwargs: Any
) -> tuple[dict, list, list]:
    """TransformerLens' caching hooks, with codebook hook points sliced on their own position
    axis under `pos_slice` (TransformerLens picks the axis by name suffix, which is wrong for
    `hook_codes` and for a per-head codebook's input/output)."""
    cache, fwd, bwd = base(*args, **kwargs)
    bound = _CACHING_SIGNATURE.bind(model, *args, **kwargs)
    bound.apply_defaults()
    slicer = Slice.unwrap(bound.arguments["pos_slice"])
    axes = codebook_position_axes(model)
    if slicer.mode == "identity" or not axes:
        return cache, fwd, bwd
    device, remove_batch_dim = bound.arguments["device"], bound.arguments["remove_batch_dim"]

    def save(tensor: torch.Tensor, hook: HookPoint, is_backward: bool = False) -> None:
        assert hook.name is not None
        axis = axes[hook.name]
        value = tensor.detach().to(device)
        if remove_batch_dim:
            value = value[0]
        if value.dim() >= -axis:
            value = slicer.apply(value, dim=axis)
        cache[hook.name + ("_grad" if is_backward else "")] = value

    def fixed(hooks: list, is_backward: bool) -> list:
        return [
            (name, partial(save, is_backward=is_backward)) if name in axes else (name, hook)
            for name, hook in hooks
        ]

    return cache, fixed(fwd, False), fixed(bwd, True)


def _slice_codebook_hooks_on_their_axis(model: torch.nn.Module) -> None:
    """Make `model.run_with_cache(pos_slice=...)` slice codebook hook points correctly.

    `HookedCodebookTransformer` does this in its class; any other HookedRootModule gets the
    same `get_caching_hooks` as an attribute of the instance when a codebook is attached.
    """
    if isinstance(model, HookedCodebookTransformer) or "get_caching_hooks" in model.__dict__:
        return
    if not isinstance(model, HookedRootModule):
        return
    base = partial(type(model).get_caching_hooks, model)

    def get_caching_hooks(self: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        return _codebook_caching_hooks(self, base, *args, **kwargs)

    object.__setattr__(model, "get_caching_hooks", types.MethodType(get_caching_hooks, model))


def check_attachable(
    model: torch.nn.Module,
    codebook: Codebook,
    hook_name: str | None = None,
    check_width: bool = True,
    replacing: bool = False,
) -> str:
    """Everything `attach_codebook` checks, without changing the model; returns the hook name.

    `replacing=True` accepts a site that already holds a codebook (loading replaces it), so a
    caller can check every site before touching any (all or nothing).
    """
    name = hook_name or codebook.cfg.hook_name
    if name is None:
        raise ValueError("No hook name: pass hook_name or set CodebookConfig.hook_name.")
    if codebook.cfg.hook_name not in (None, name):
        raise ValueError(
            f"The codebook was configured for {codebook.cfg.hook_name!r} but is being attached at {name!r}."
        )
    hook_dict: Mapping[str, HookPoint] = model.hook_dict  # type: ignore[assignment]
    if name not in hook_dict:
        raise unknown_hook_error(name, hook_dict)
    current = hook_dict[name]
    if isinstance(current, Codebook) and not replacing:
        raise ValueError(f"A codebook already sits at {name!r}; remove it first.")
    if name.rsplit(".", 1)[-1] in CODEBOOK_HOOK_SUFFIXES:
        raise ValueError(f"{name!r} is a codebook's own hook point; attach at a model hook point.")
    if not isinstance(current, Codebook) and (current.fwd_hooks or current.bwd_hooks):
        raise ValueError(
            f"The hook point {name!r} has hooks attached; remove them (model.reset_hooks("
            "including_permanent=True)) before adding a codebook there."
        )
    if check_width and isinstance(model, HookedTransformer):
        shape = probe_activation_shape(model, name)
        try:
            codebook._grouped(torch.empty(shape, device="meta"))
        except ValueError as err:
            raise ValueError(
                f"Cannot attach at {name!r}: the activation there has shape {shape} "
                f"(batch, pos, ...) but {err}"
            ) from None
    return name


def attach_codebook(
    model: torch.nn.Module,
    codebook: Codebook,
    hook_name: str | None = None,
    check_width: bool = True,
) -> Codebook:
    """Put `codebook` at the HookPoint `hook_name` (default `codebook.cfg.hook_name`) of `model`.

    Works on any HookedRootModule (HookedTransformer, HookedSAETransformer, ...). The original
    HookPoint is kept, so `detach_codebook` restores it; the codebook moves to the model's
    device and its `cfg.hook_name` is set to the site.

    Args:
        model: the model to put the codebook in.
        codebook: the codebook; its `d_in` must fit the activation's last axis (or its last two
            axes as `[n_groups, d_group]`).
        hook_name: the site; default `codebook.cfg.hook_name`.
        check_width: run a one-token forward (HookedTransformer models) to check the
            activation's shape before attaching.

    Returns:
        `codebook`, now part of `model`.

    Raises:
        UnknownHookError: for a name the model does not have (listing close names).
        ValueError: for no hook name at all, a name other than the codebook's configured one,
            a site that already holds a codebook or has hooks attached, a codebook's own hook
            point, or an activation whose width does not fit the codebook.
    """
    name = check_attachable(model, codebook, hook_name, check_width)
    hook_dict: Mapping[str, HookPoint] = model.hook_dict  # type: ignore[assignment]
    current = hook_dict[name]
    codebook.cfg.hook_name = name
    parent, attr = _parent_and_attr(model, name)
    originals: dict[str, HookPoint] = model.__dict__.setdefault(_ORIGINALS_ATTR, {})
    originals[name] = current
    param = next(model.parameters(), None)
    if param is not None:
        codebook.to(param.device)
    setattr(parent, attr, codebook)
    model.setup()  # type: ignore[operator]
    _slice_codebook_hooks_on_their_axis(model)
    return codebook


def detach_codebook(model: torch.nn.Module, hook_name: str) -> Codebook:
    """Take the codebook at `hook_name` out of `model`, restoring the original HookPoint.

    Hooks on the codebook and on its own hook points are removed with it.

    Returns:
        The detached codebook (its weights unchanged, reusable elsewhere).

    Raises:
        UnknownHookError: if no codebook sits at `hook_name` (listing the closest sites).
    """
    present = codebooks_of(model)
    if hook_name not in present:
        raise unknown_hook_error(hook_name, present, what="codebook")
    codebook = present[hook_name]
    codebook.remove_hooks("both", including_permanent=True)
    for hp in (codebook.hook_codebook_in, codebook.hook_codes, codebook.hook_codebook_out):
        hp.remove_hooks("both", including_permanent=True)
    originals: dict[str, HookPoint] = model.__dict__.setdefault(_ORIGINALS_ATTR, {})
    original = originals.pop(hook_name, None) or HookPoint()
    parent, attr = _parent_and_attr(model, hook_name)
    setattr(parent, attr, original)
    model.setup()  # type: ignore[operator]
    return codebook


@contextmanager
def codebooks_disabled(
    model: torch.nn.Module, names: Iterable[str] | None = None
) -> Iterator[None]:
    """Bypass codebooks (all, or `names`) inside the block: the base model's exact behaviour.

    A bypassed codebook passes its input through unchanged and runs none of its hook points;
    each codebook's previous `enabled` state is restored on exit.

    Raises:
        UnknownHookError: (on entering) for a name in `names` with no codebook.
    """
    present = codebooks_of(model)
    chosen = list(present) if names is None else list(names)
    for name in chosen:
        if name not in present:
            raise unknown_hook_error(name, present, what="codebook")
    before = {name: present[name].enabled for name in chosen}
    try:
        for name in chosen:
            present[name].enabled = False
        yield
    finally:
        for name, was in before.items():
            present[name].enabled = was


class HookedCodebookTransformer(HookedTransformer):
    """A HookedTransformer with codebooks at any of its hook points.

    Built like any HookedTransformer (`HookedCodebookTransformer(cfg)`, `.from_pretrained(name)`)
    or wrapped around an existing one with `from_model` (weights shared, not copied).
    Its additions are methods over the module-level functions (`add_codebook` is
    `attach_codebook`, ...), plus two fixes of TransformerLens behaviour: `run_with_cache`'s
    `pos_slice` slices codebook hook points on their own position axis, and cached `generate`
    gets absolute positions right for models without a tokenizer.
    """

    fine_tuned: bool = False
    """Set by joint training: the base weights changed, so `save_codebooks` saves them too."""

    @classmethod
    def from_model(cls, model: HookedTransformer) -> HookedCodebookTransformer:
        """Wrap `model`: a new module tree that shares every parameter and buffer with `model`.

        Adding codebooks to the result leaves `model` untouched, while fine-tuning the result
        trains `model`'s weights too (they are the same tensors).

        Raises:
            TypeError: if `model` is not a HookedTransformer.
            ValueError: if `model` has hooks attached (reset them first).
        """
        if not isinstance(model, HookedTransformer):
            raise TypeError(f"from_model expects a HookedTransformer, got {type(model).__name__}.")
        memo: dict[int, Any] = {id(t): t for t in model.parameters()}
        memo.update({id(t): t for t in model.buffers()})
        memo[id(model.cfg)] = model.cfg
        if model.tokenizer is not None:
            memo[id(model.tokenizer)] = model.tokenizer
        for hp in model.hook_dict.values():
            if hp.fwd_hooks or hp.bwd_hooks:
                raise ValueError(
                    f"from_model: the model has hooks at {hp.name!r}; reset them first "
                    "(model.reset_hooks(including_permanent=True))."
                )
        wrapped = copy.deepcopy(model, memo)
        wrapped.__class__ = cls
        wrapped.setup()
        return wrapped  # type: ignore[return-value]

    # -- codebooks ----------------------------------------------------------------------------

    @property
    def codebooks(self) -> dict[str, Codebook]:
        """The codebooks in the model, keyed by hook name."""
        return codebooks_of(self)

    def add_codebook(self, codebook: Codebook, hook_name: str | None = None) -> Codebook:
        """Put `codebook` at `hook_name` (default: its `cfg.hook_name`); see `attach_codebook`.

        Returns:
            `codebook`, now part of the model.

        Raises:
            UnknownHookError: for a hook name the model does not have.
            ValueError: for a site that cannot take the codebook (see `attach_codebook`).
        """
        return attach_codebook(self, codebook, hook_name)

    def remove_codebooks(self, names: str | Iterable[str] | None = None) -> dict[str, Codebook]:
        """Remove codebooks (all when `names` is None); returns the removed ones by name.

        `names` is one site name or several. Nothing is removed unless every name is found.

        Raises:
            UnknownHookError: for a name with no codebook (listing the closest sites).
        """
        chosen = (
            list(self.codebooks)
            if names is None
            else [names]
            if isinstance(names, str)
            else list(names)
        )
        present = self.codebooks
        for name in chosen:
            if name not in present:
                raise unknown_hook_error(name, present, what="codebook")
        return {name: detach_codebook(self, name) for name in chosen}

    def codebooks_disabled(self, names: Iterable[str] | None = None):  # noqa: ANN201
        """Context manager: codebooks bypassed inside the block (the base model's behaviour).

        See the function `codebooks_disabled`; raises UnknownHookError for a name with no
        codebook.
        """
        return codebooks_disabled(self, names)

    def force_codes(self, codes: Mapping[str, Any], positions: int | Iterable[Any] | None = None):  # noqa: ANN201
        """Context manager: these codes are active at `positions` (all when None).

        Positions are absolute in the whole sequence; negative ones count back from the end of
        the input (the prompt, for generate), resolved once; see the function `force_codes`,
        which also lists the errors raised for bad sites, ids and positions.
        """
        from tl_codebook.hooks.interventions import force_codes

        return force_codes(self, codes, positions)

    def ablate_codes(self, codes: Mapping[str, Any]):  # noqa: ANN201
        """Context manager: these codes can never be chosen; the next best are.

        See the function `ablate_codes`, which also lists the errors raised for bad sites and ids.
        """
        from tl_codebook.hooks.interventions import ablate_codes

        return ablate_codes(self, codes)

    def save_codebooks(self, path: str | Path, save_model_weights: bool | None = None) -> Path:
        """Save all codebooks (safetensors + JSON) to the directory `path`.

        The model's own weights are saved too when it was jointly fine-tuned (`fine_tuned`),
        unless `save_model_weights=False`; `True` saves them regardless.

        Returns:
            `path`, as a `Path`.

        Raises:
            ValueError: if the model has no codebooks, or `path` is a file or a directory
                holding other files.
        """
        from tl_codebook.io import save_codebooks

        return save_codebooks(self, path, save_model_weights=save_model_weights)

    def load_codebooks(
        self, path: str | Path, load_model_weights: bool = True
    ) -> dict[str, Codebook]:
        """Load codebooks saved by `save_codebooks` into this model (replacing any at those sites).

        All or nothing; see the function `load_codebooks` for what is checked.

        Returns:
            `{site: codebook}` for the codebooks loaded.

        Raises:
            CodebookFileError: for missing, corrupted or mismatched files, or a model of
                another shape than the one saved.
            UnknownHookError: for a saved site this model does not have.
        """
        from tl_codebook.io import load_codebooks

        return load_codebooks(self, path, load_model_weights=load_model_weights)

    def get_caching_hooks(self, *args: Any, **kwargs: Any) -> tuple[dict, list, list]:  # type: ignore[override]
        """TransformerLens' caching hooks; under `pos_slice`, codebook hook points are sliced on
        their own position axis (`hook_codes`: Int[batch, pos, n_groups, k])."""
        return _codebook_caching_hooks(self, super().get_caching_hooks, *args, **kwargs)

    # -- generation ----------------------------------------------------------------------------

    _generating: bool = False

    def generate(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        """`HookedTransformer.generate`, with the KV cache made exact for models without a tokenizer.

        TransformerLens 3.9's cached generate without an attention mask (no tokenizer) computes
        absolute ("standard"/"shortformer") positional embeddings for the whole sequence with
        the cache length as offset, so every new token after the first gets the wrong position.
        While generating, `get_residual` is given an all-ones attention mask, which makes
        TransformerLens take each token's position from the mask (what it does when there is a
        tokenizer). Cached and uncached generation then agree, and both equal a step-by-step
        greedy loop (tests); rotary models were never affected.
        """
        previous, self._generating = self._generating, True
        try:
            return super().generate(*args, **kwargs)
        finally:
            self._generating = previous

    def generate_stream(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        """`HookedTransformer.generate_stream`, with the same fix as `generate`."""
        previous, self._generating = self._generating, True
        try:
            yield from super().generate_stream(*args, **kwargs)
        finally:
            self._generating = previous

    def get_residual(self, embed: Any, pos_offset: int, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        """`HookedTransformer.get_residual`; while generating (see `generate`), a cached step of
        a model with absolute positional embeddings gets an all-ones `attention_mask`
        (`[batch, pos]`) so each token's position is read from it."""
        if (
            self._generating
            and pos_offset
            and kwargs.get("attention_mask") is None
            and self.cfg.positional_embedding_type in ("standard", "shortformer")
        ):
            kwargs["attention_mask"] = torch.ones(
                embed.shape[:2], dtype=torch.long, device=embed.device
            )
        return super().get_residual(embed, pos_offset, *args, **kwargs)
