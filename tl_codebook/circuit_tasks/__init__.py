"""Circuit tasks whose true circuit is known: an induction model trained here (heads outside the
circuit present), a tracr-compiled program, and a hand-built model where one head carries the
metric. Each builds a `tl_codebook.comparisons.circuits.task.CircuitTask`; `tl-codebook circuits`
runs every method on them (see `cli`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tl_codebook.comparisons.circuits.task import CircuitTask

_LAZY = {
    "one_head_task": "tl_codebook.circuit_tasks.one_head",
    "CARRIER": "tl_codebook.circuit_tasks.one_head",
    "compiled_task": "tl_codebook.circuit_tasks.compiled",
    "load_compiled_model": "tl_codebook.circuit_tasks.compiled",
    "convert_tracr_two_back": "tl_codebook.circuit_tasks.compiled",
    "induction_task": "tl_codebook.circuit_tasks.induction",
    "load_induction_model": "tl_codebook.circuit_tasks.induction",
    "train_induction_model": "tl_codebook.circuit_tasks.induction",
}


def __getattr__(name: str) -> Any:
    """The tasks' builders, imported on first access."""
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_LAZY[name]), name)


def _induction(seed: int, n_prompts: int) -> CircuitTask:
    from tl_codebook.circuit_tasks.induction import induction_task

    return induction_task(seed=seed, n_prompts=n_prompts)


def _compiled(seed: int, n_prompts: int) -> CircuitTask:
    from tl_codebook.circuit_tasks.compiled import compiled_task

    return compiled_task(n_prompts=n_prompts, seed=seed)


def _one_head(seed: int, n_prompts: int) -> CircuitTask:
    from tl_codebook.circuit_tasks.one_head import one_head_task

    return one_head_task(n_prompts=n_prompts, seed=seed)


CIRCUIT_TASKS: dict[str, Callable[[int, int], CircuitTask]] = {
    "induction": _induction,
    "compiled": _compiled,
    "one_head": _one_head,
}
"""Task family -> builder(seed, n_prompts). For induction the seed picks the shipped model
(0, 1 or 2); for the others it picks the prompts."""

SEEDED_MODELS = ("induction",)
"""Families whose seed picks a different trained model (reported with spread over seeds)."""

__all__ = ["CIRCUIT_TASKS", "SEEDED_MODELS", *sorted(_LAZY)]
