"""Atomic training checkpoints: tensors in safetensors, everything else in JSON, never pickle.

A run killed at any moment leaves the previous checkpoint or the new one, never half of one;
helpers turn optimizer and RNG states into (tensors, JSON) pairs and back for exact resumes.
"""

import json
import os
import random
import re
import shutil
import uuid
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from tl_codebook.files import TEMP_PREFIX, atomic_write_bytes, fsync_path, remove_leftovers

TENSORS_FILE = "tensors.safetensors"
STATE_FILE = "state.json"
LATEST_POINTER = "latest"
FORMAT_VERSION = 1
_STEP_DIR = re.compile(r"^step-(\d{8,})$")


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be written, or a checkpoint that cannot be read."""


class DamagedCheckpointWarning(UserWarning):
    """The latest checkpoint cannot be read; an earlier complete one is used instead."""


class Checkpoint(NamedTuple):
    step: int
    tensors: dict[str, Tensor]
    state: dict[str, Any]


def ensure_writable(directory: str | os.PathLike) -> Path:
    """Create `directory` if needed and prove a file can be written and synced in it."""
    path = Path(directory)
    probe = path / f"{TEMP_PREFIX}probe-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as file:
            file.write(b"ok")
            file.flush()
            os.fsync(file.fileno())
        probe.unlink()
    except OSError as error:
        raise CheckpointError(
            f"checkpoint directory {str(path)!r} is not writable: {error}"
        ) from error
    return path


def save_checkpoint(
    directory: str | os.PathLike,
    step: int,
    tensors: Mapping[str, Tensor],
    state: Mapping[str, Any],
    keep_last: int | None = None,
) -> Path:
    """Write `step-{step:08d}/` (tensors.safetensors + state.json) atomically; return its path.

    Both files are written and fsync'ed inside a temporary directory, which is then renamed to
    its final name, and the `latest` pointer file is replaced the same way; so a reader sees
    either the old checkpoint or the new one. Re-saving an existing step replaces it. With
    `keep_last`, older step directories beyond the newest `keep_last` are deleted. Leftovers of
    writers that died are removed first, so only one process may write to `directory`.
    """
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be an int >= 0, got {step!r}")
    if keep_last is not None and keep_last < 1:
        raise ValueError(f"keep_last must be >= 1 or None (keep all), got {keep_last}")
    state_bytes = json.dumps(
        {"format_version": FORMAT_VERSION, "step": step, "state": dict(state)}, indent=1
    ).encode()
    cpu_tensors = _unshared_cpu_tensors(tensors)
    root = ensure_writable(directory)
    remove_leftovers(root)

    final = root / f"step-{step:08d}"
    temp = root / f"{TEMP_PREFIX}{final.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    replaced = None
    temp.mkdir()
    try:
        save_file(cpu_tensors, str(temp / TENSORS_FILE), metadata={"step": str(step)})
        fsync_path(temp / TENSORS_FILE)
        (temp / STATE_FILE).write_bytes(state_bytes)  # inside the temporary directory
        fsync_path(temp / STATE_FILE)
        fsync_path(temp)
        if final.exists():
            replaced = root / f"{TEMP_PREFIX}replaced-{final.name}-{uuid.uuid4().hex[:8]}"
            os.rename(final, replaced)
        os.rename(temp, final)
        fsync_path(root)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    atomic_write_bytes(root / LATEST_POINTER, f"{final.name}\n".encode())
    if replaced is not None:
        shutil.rmtree(replaced, ignore_errors=True)
    if keep_last is not None:
        for old in list_checkpoints(root)[:-keep_last]:
            if old != final:
                _remove_atomically(old)
    return final


def list_checkpoints(directory: str | os.PathLike) -> list[Path]:
    """Complete step directories in `directory`, oldest step first (temporaries excluded)."""
    root = Path(directory)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name)]
    return sorted(found, key=lambda p: int(p.name.removeprefix("step-")))


def load_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu") -> Checkpoint:
    """Read one step directory written by `save_checkpoint`, tensors onto `device`."""
    path = Path(path)
    try:
        payload = json.loads((path / STATE_FILE).read_text())
        tensors = load_file(str(path / TENSORS_FILE), device=str(device))
    except (OSError, ValueError, SafetensorError) as error:
        raise CheckpointError(f"checkpoint {str(path)!r} cannot be read: {error}") from error
    if not isinstance(payload, dict) or payload.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {str(path)!r} has an unknown format in {STATE_FILE}; expected "
            f"format_version {FORMAT_VERSION}"
        )
    return Checkpoint(step=payload["step"], tensors=tensors, state=payload["state"])


def load_latest_checkpoint(
    directory: str | os.PathLike, device: str | torch.device = "cpu"
) -> Checkpoint | None:
    """The checkpoint named by `directory/latest`, or None when there is none yet.

    The pointer decides (a run resumed from an earlier step may have newer-numbered leftovers);
    without a pointer, or when it names a directory that is gone (a writer died mid re-save),
    the highest complete step directory is used. Temporary directories are never read. When
    that checkpoint is damaged (a disk fault, a hand edit), the next earlier one that reads is
    used, with a `DamagedCheckpointWarning` naming the damaged one: losing a few steps beats
    losing the run. With no readable checkpoint the first error is raised.
    """
    root = Path(directory)
    pointer = root / LATEST_POINTER
    complete = list_checkpoints(root)
    latest = complete[-1] if complete else None
    if pointer.is_file():
        name = pointer.read_text().strip()
        if not _STEP_DIR.match(name):
            raise CheckpointError(f"{str(pointer)!r} names {name!r}, which is not a step-N dir")
        if (root / name).is_dir():
            latest = root / name
    if latest is None:
        return None
    candidates = [latest] + [p for p in reversed(complete) if _step_of(p) < _step_of(latest)]
    first_error: CheckpointError | None = None
    for path in candidates:
        try:
            checkpoint = load_checkpoint(path, device)
        except CheckpointError as error:
            first_error = first_error or error
            continue
        if first_error is not None:
            warnings.warn(
                f"{first_error}; resuming from the earlier complete checkpoint {str(path)!r}",
                DamagedCheckpointWarning,
                stacklevel=2,
            )
        return checkpoint
    assert first_error is not None
    raise first_error


def _step_of(path: Path) -> int:
    return int(path.name.removeprefix("step-"))


def optimizer_state_to_checkpoint(
    optimizer_state: Mapping[str, Any], prefix: str = "optim"
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Split `optimizer.state_dict()` into tensors (`{prefix}.state.{param_idx}.{name}`) and JSON."""
    tensors: dict[str, Tensor] = {}
    per_param: dict[str, dict[str, Any]] = {}
    for param_idx, values in optimizer_state["state"].items():
        json_values = {}
        for name, value in values.items():
            if isinstance(value, Tensor):
                tensors[f"{prefix}.state.{param_idx}.{name}"] = value
            else:
                json_values[name] = _encode_json(value, f"state[{param_idx}][{name!r}]")
        per_param[str(param_idx)] = json_values
    groups = []
    for group_idx, group in enumerate(optimizer_state["param_groups"]):
        json_group = {}
        for name, value in group.items():
            if isinstance(value, Tensor):
                tensors[f"{prefix}.param_groups.{group_idx}.{name}"] = value
            else:
                json_group[name] = _encode_json(value, f"param_groups[{group_idx}][{name!r}]")
        groups.append(json_group)
    return tensors, {"state": per_param, "param_groups": groups}


def optimizer_state_from_checkpoint(
    tensors: Mapping[str, Tensor], state: Mapping[str, Any], prefix: str = "optim"
) -> dict[str, Any]:
    """Rebuild the `optimizer.state_dict()` that `optimizer_state_to_checkpoint` split."""
    per_param = {
        int(idx): {name: _decode_json(value) for name, value in values.items()}
        for idx, values in state["state"].items()
    }
    groups = [
        {name: _decode_json(value) for name, value in group.items()}
        for group in state["param_groups"]
    ]
    state_head, group_head = f"{prefix}.state.", f"{prefix}.param_groups."
    for key, value in tensors.items():
        if key.startswith(state_head):
            idx, name = key.removeprefix(state_head).split(".", 1)
            per_param.setdefault(int(idx), {})[name] = value
        elif key.startswith(group_head):
            idx, name = key.removeprefix(group_head).split(".", 1)
            groups[int(idx)][name] = value
    return {"state": per_param, "param_groups": groups}


def rng_state_to_checkpoint(
    generators: Mapping[str, torch.Generator] | None = None, prefix: str = "rng"
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Capture torch (CPU, every initialised CUDA device, `generators`), python and numpy RNGs."""
    tensors = {f"{prefix}.torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for device_idx, device_state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"{prefix}.cuda.{device_idx}"] = device_state
    for name, generator in (generators or {}).items():
        tensors[f"{prefix}.generator.{name}"] = generator.get_state()
    version, internal, gauss_next = random.getstate()
    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state(legacy=True)  # type: ignore[misc]
    state = {
        "python": [version, list(internal), gauss_next],
        "numpy": [
            kind,
            np.asarray(keys).tolist(),
            int(position),
            int(has_gauss),
            float(cached_gaussian),
        ],
    }
    return tensors, state


def restore_rng_state(
    tensors: Mapping[str, Tensor],
    state: Mapping[str, Any],
    generators: Mapping[str, torch.Generator] | None = None,
    prefix: str = "rng",
) -> None:
    """Put back the RNG states that `rng_state_to_checkpoint` captured (CUDA devices that exist)."""
    torch.set_rng_state(tensors[f"{prefix}.torch"].cpu())
    cuda_head = f"{prefix}.cuda."
    for key, value in tensors.items():
        if key.startswith(cuda_head) and torch.cuda.is_available():
            device_idx = int(key.removeprefix(cuda_head))
            if device_idx < torch.cuda.device_count():
                torch.cuda.set_rng_state(value.cpu(), device_idx)
    for name, generator in (generators or {}).items():
        key = f"{prefix}.generator.{name}"
        if key not in tensors:
            saved = sorted(k.removeprefix(f"{prefix}.generator.") for k in tensors)
            raise CheckpointError(f"no saved state for generator {name!r}; saved: {saved}")
        generator.set_state(tensors[key].cpu())
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    kind, keys, position, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state(
        (kind, np.asarray(keys, dtype=np.uint32), position, has_gauss, cached_gaussian)
    )


def _unshared_cpu_tensors(tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """CPU, contiguous tensors; ones sharing memory with an earlier one are copied
    (safetensors refuses shared storage, e.g. tied weights)."""
    result: dict[str, Tensor] = {}
    seen_storages: set[int] = set()
    for name, tensor in tensors.items():
        if not isinstance(tensor, Tensor):
            raise TypeError(
                f"checkpoint tensor {name!r} is a {type(tensor).__name__}, not a Tensor"
            )
        tensor = tensor.detach().cpu().contiguous()
        storage = tensor.untyped_storage().data_ptr()
        if storage in seen_storages and tensor.numel() > 0:
            tensor = tensor.clone()
        seen_storages.add(tensor.untyped_storage().data_ptr())
        result[name] = tensor
    return result


def _encode_json(value: Any, where: str) -> Any:
    if isinstance(value, tuple):
        return {"__tuple__": [_encode_json(item, where) for item in value]}
    if isinstance(value, list):
        return [_encode_json(item, where) for item in value]
    if isinstance(value, dict):
        return {str(key): _encode_json(item, where) for key, item in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"optimizer {where} is a {type(value).__name__}, which JSON cannot hold")


def _decode_json(value: Any) -> Any:
    if isinstance(value, dict):
        if set(value) == {"__tuple__"}:
            return tuple(_decode_json(item) for item in value["__tuple__"])
        return {key: _decode_json(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_decode_json(item) for item in value]
    return value


def _remove_atomically(directory: Path) -> None:
    """Rename to a temporary name first, so no half-deleted step directory is ever visible."""
    doomed = directory.with_name(f"{TEMP_PREFIX}removed-{directory.name}-{uuid.uuid4().hex[:8]}")
    os.rename(directory, doomed)
    shutil.rmtree(doomed, ignore_errors=True)
