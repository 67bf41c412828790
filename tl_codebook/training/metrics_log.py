"""Training metrics as JSON lines (`metrics.jsonl`), one object per logged step.

Plain files survive crashes, need no service and load with one line of pandas; a resumed run
first drops the lines logged after its checkpoint, so no step appears twice.
"""

import json
import math
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tl_codebook.files import atomic_write_text, json_ready, json_text

METRICS_FILE = "metrics.jsonl"


class MetricsLogger:
    """Append `{"step": ..., "time": ..., **metrics}` lines to a JSON-lines file, flushed each.

    `path` is the `.jsonl` file itself or a directory to hold `metrics.jsonl`. A fresh run
    (`resume_step=None`) starts the file empty; a resumed one keeps only the lines with
    `step <= resume_step` (and drops a half-written last line of a killed run). Tensors and
    numpy scalars are stored as numbers; NaN and infinities as null, so every line is strict
    JSON.
    """

    def __init__(self, path: str | os.PathLike, resume_step: int | None = None):
        path = Path(path)
        self.path = path if path.suffix == ".jsonl" else path / METRICS_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = [] if resume_step is None else _lines_up_to(self.path, resume_step)
        atomic_write_text(self.path, "".join(kept))
        self._file = open(self.path, "a")

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        record: dict[str, Any] = {"step": step, "time": time.time()}
        for name, value in metrics.items():
            if name in record:
                raise ValueError(f"metric name {name!r} is reserved; the logger writes it")
            record[name] = _plain(value, name)
        self._file.write(json_text(record, indent=None) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Every complete record of a metrics file (or of `metrics.jsonl` in a directory)."""
    path = Path(path)
    path = path if path.suffix == ".jsonl" else path / METRICS_FILE
    return [json.loads(line) for line in _complete_lines(path)]


def _lines_up_to(path: Path, step: int) -> list[str]:
    return [line for line in _complete_lines(path) if json.loads(line).get("step", 0) <= step]


def _complete_lines(path: Path) -> list[str]:
    if not path.exists():
        return []
    lines = path.read_text().splitlines(keepends=True)
    return [line for line in lines if line.endswith("\n") and _parses(line)]


def _parses(line: str) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except json.JSONDecodeError:
        return False


def _plain(value: Any, name: str) -> Any:
    """A JSON-ready scalar (`files.json_ready`: tensors and numpy scalars become numbers,
    non-finite floats null); anything else is refused, naming the metric."""
    if isinstance(value, (dict, list, tuple, set)):
        raise TypeError(f"metric {name!r} is a {type(value).__name__}; log numbers or strings")
    if hasattr(value, "shape") and hasattr(value, "item") and math.prod(value.shape) == 1:
        value = value.item()  # a one-element tensor or array, a numpy scalar
    plain = json_ready(value)
    if isinstance(plain, list):
        raise ValueError(f"metric {name!r} must be a scalar, got shape {tuple(value.shape)}")
    return plain
