"""`metrics.json`, the record of a TokFSM run: every number it measured, its config and status.

One writer and one reader, so the file is always strict JSON (NaN as null, floats rounded to
six digits) and always whole (an atomic write: a killed run leaves the previous version).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tl_codebook.files import atomic_write_json

METRICS_FILE = "metrics.json"
DIGITS = 6
"""Floats in metrics.json are rounded to this many digits (readable, and stable across reruns)."""

CONTRACT_KEYS = (
    "base_transition_accuracy",
    "codebook_transition_accuracy",
    "states_with_precise_code",
    "intervention_success",
    "intervention_success_random_code",
)
"""The top-level numbers every finished run has (floats in [0, 1]); `tl-codebook demo` prints them."""


def write_metrics(out_dir: str | Path, metrics: dict[str, Any]) -> Path:
    """Write `out_dir/metrics.json` atomically (a killed run never leaves a half-written file)."""
    return atomic_write_json(Path(out_dir) / METRICS_FILE, metrics, digits=DIGITS)


def read_metrics(out_dir: str | Path) -> dict[str, Any]:
    """The metrics a run wrote into `out_dir` (a ValueError naming the file if there are none)."""
    path = Path(out_dir) / METRICS_FILE
    if not path.is_file():
        raise ValueError(f"{str(path)!r} does not exist: {str(out_dir)!r} holds no TokFSM run.")
    try:
        metrics = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{str(path)!r} is not valid JSON: {err}.") from None
    if not isinstance(metrics, dict):
        raise ValueError(f"{str(path)!r} holds {type(metrics).__name__}, not a JSON object.")
    return metrics
