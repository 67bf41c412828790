"""A training run's directory: what counts as its results, when a new run may start there, and
which data its checkpoints were trained on, so that no run destroys or silently continues another.

`prepare_run_dir` runs (with the directory's lock held, `files.locked_run_dir`) before any
work: a fresh run refuses to start over results without `overwrite`, and `resume` refuses a
directory with results but no checkpoint. `DataIdentity` goes into every checkpoint and
refuses a resume on other data.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from tl_codebook.files import TEMP_PREFIX, json_ready, remove_leftovers
from tl_codebook.training.checkpoint import list_checkpoints

CHECKPOINT_DIR = "checkpoints"
RESULTS = ("summary.json", "metrics.jsonl", CHECKPOINT_DIR, "codebooks", "diagnostics")
"""What a run leaves in its directory; another run may not mix its own with them."""


def existing_results(out_dir: str | os.PathLike) -> list[str]:
    """The names in `RESULTS` that `out_dir` holds."""
    return [name for name in RESULTS if (Path(out_dir) / name).exists()]


def prepare_run_dir(out_dir: str | os.PathLike, resume: bool, overwrite: bool) -> None:
    """Check that a run may start in `out_dir` (call it holding the directory's lock).

    - a fresh run over results fails unless `overwrite`, which then removes them (metrics of
      two runs in one file, or checkpoints of two runs side by side, cannot be told apart);
    - `resume` with results but no checkpoint fails (starting over would destroy them);
    - leftovers of writers that died (temporary names) are removed.
    """
    out = Path(out_dir)
    if resume and overwrite:
        raise ValueError(
            "--resume continues the run in --out and --overwrite replaces it: give one."
        )
    found = existing_results(out)
    if resume:
        check_resume_has_checkpoint(out)
    elif found and not overwrite:
        raise ValueError(
            f"{str(out)!r} already holds the results of a run ({', '.join(found)}); pass "
            "--overwrite to replace them, --resume to continue that run, or choose another --out."
        )
    elif found:
        for name in found:
            _remove(out / name)
    if out.is_dir():
        remove_leftovers(out)


def check_resume_has_checkpoint(out_dir: str | os.PathLike) -> bool:
    """True when `out_dir` has a checkpoint to resume from; False when it is a new run (no
    results either); a ValueError when it holds results but no checkpoint."""
    out = Path(out_dir)
    if list_checkpoints(out / CHECKPOINT_DIR):
        return True
    found = existing_results(out)
    if found:
        raise ValueError(
            f"cannot resume in {str(out)!r}: it holds results ({', '.join(found)}) but no "
            "checkpoint (train with a checkpoint interval to make a run resumable); starting "
            "over would destroy them. Pass --overwrite (resume=False) to replace them."
        )
    return False


def _remove(path: Path) -> None:
    """Rename first, so a kill mid-removal leaves a temporary name, never half a result."""
    doomed = path.with_name(f"{TEMP_PREFIX}removed-{path.name}-{uuid.uuid4().hex[:8]}")
    os.rename(path, doomed)
    if doomed.is_dir():
        shutil.rmtree(doomed, ignore_errors=True)
    else:
        doomed.unlink(missing_ok=True)


def _fingerprint(batch: Any) -> str:
    """A SHA-256 of a batch: token ids or activation rows (shape, dtype and values), or a
    mapping of names to such tensors (sorted by name)."""
    digest = hashlib.sha256()
    items = sorted(batch.items()) if isinstance(batch, Mapping) else [("", batch)]
    for name, value in items:
        tensor = torch.as_tensor(value).detach().cpu().contiguous()
        digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class DataIdentity:
    """Which data a run trains on (token batches or activation rows): the caller's `data_id` (the CLI passes the dataset's name or
    path, split, column and, for local files, size and modification time) and a fingerprint of
    the first batch. Saved in every checkpoint; `expect` + `watch` refuse a resume on other
    data, which would otherwise continue silently on batches the run never saw.
    """

    def __init__(self, data_id: Any = None):
        self.data_id = json_ready(data_id)
        self.first_batch: str | None = None
        self._expected_first_batch: str | None = None

    def to_state(self) -> dict[str, Any]:
        return {"data_id": self.data_id, "first_batch_sha256": self.first_batch}

    def expect(self, saved: dict[str, Any] | None) -> None:
        """Check against a checkpoint's saved identity (None: a checkpoint from before this
        record existed, nothing to check). The first batch is checked when `watch` sees it."""
        if not saved:
            return
        old = saved.get("data_id")
        if old is not None and self.data_id is not None and old != self.data_id:
            raise ValueError(
                f"cannot resume on other data: the checkpoint was trained on {old!r}, "
                f"this run reads {self.data_id!r}."
            )
        self._expected_first_batch = saved.get("first_batch_sha256")

    def watch(self, batches: Iterable[Any]) -> Iterator[Any]:
        """`batches` unchanged; the first one is fingerprinted (and checked on resume)."""
        iterator = iter(batches)
        for batch in iterator:
            if self.first_batch is None:
                self.first_batch = _fingerprint(batch)
                expected = self._expected_first_batch
                if expected is not None and expected != self.first_batch:
                    raise ValueError(
                        "cannot resume on other data: the first batch differs from the one the "
                        f"checkpoint was trained on (sha256 {self.first_batch[:12]}... vs "
                        f"{expected[:12]}...)."
                    )
            yield batch
