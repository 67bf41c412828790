"""Writing an activation store: run the model once (or take given tensors) and write SAELens'
cached-activations layout plus our manifest, the whole directory built under a temporary name and
swapped in at the end (`files.atomic_directory`), so a killed build never leaves half a store.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from tl_codebook.comparisons.store.fingerprint import model_fingerprint, model_name_of
from tl_codebook.comparisons.store.manifest import (
    MANIFEST,
    TOKEN_COLUMN,
    ShardInfo,
    StoreError,
    StoreManifest,
    check_dtype,
)
from tl_codebook.files import TEMP_PREFIX, atomic_directory, atomic_write_json


def stop_layer(hooks: Sequence[str], n_layers: int) -> int | None:
    """One past the last block any hook sits in (None: a hook after the blocks, or all blocks)."""
    layers = []
    for name in hooks:
        head, _, rest = name.partition(".")
        if head != "blocks":
            return None
        layers.append(int(rest.split(".", 1)[0]))
    last = max(layers) + 1
    return None if last >= n_layers else last


@contextmanager
def quiet_datasets() -> Iterator[None]:
    """No `datasets` progress bar per shard (our own bar covers the whole build)."""
    import datasets.utils as ds_utils

    was_disabled = ds_utils.are_progress_bars_disabled()
    ds_utils.disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            ds_utils.enable_progress_bars()


class ShardWriter:
    """Accumulates sequences and writes one `datasets` shard per `shard_sequences` of them."""

    def __init__(
        self,
        path: Path,
        hooks: Mapping[str, Sequence[int]],
        context_size: int,
        dtype: str,
        shard_sequences: int,
    ):
        from datasets import Array2D, Features, Sequence, Value

        self.path, self.tmp = path, path / f"{TEMP_PREFIX}shards"
        self.tmp.mkdir(parents=True)
        self.hooks = {h: int(np.prod(shape)) for h, shape in hooks.items()}
        self.context_size, self.dtype = context_size, dtype
        self.shard_sequences = shard_sequences
        columns: dict[str, Any] = {
            h: Array2D(shape=(context_size, d), dtype=dtype) for h, d in self.hooks.items()
        }
        columns[TOKEN_COLUMN] = Sequence(Value(dtype="int32"), length=context_size)
        self.features = Features(columns)
        self.pending: list[dict[str, np.ndarray]] = []
        self.pending_rows = 0
        self.shard_dirs: list[Path] = []
        self.shard_rows: list[int] = []

    def add(self, tokens: Tensor, acts: Mapping[str, Tensor]) -> None:
        np_dtype = np.dtype(self.dtype)
        chunk = {TOKEN_COLUMN: tokens.to("cpu", torch.int32).numpy()}
        for hook, d in self.hooks.items():
            act = acts[hook].detach().cpu()
            if act.dtype not in (torch.float16, torch.float32, torch.float64):
                act = act.float()  # e.g. bfloat16, which numpy lacks
            chunk[hook] = (
                act.reshape(tokens.shape[0], self.context_size, d).numpy().astype(np_dtype)
            )
        self.pending.append(chunk)
        self.pending_rows += tokens.shape[0]
        while self.pending_rows >= self.shard_sequences:
            self._flush(self.shard_sequences)

    def _flush(self, rows: int) -> None:
        from datasets import Dataset

        merged = {k: np.concatenate([c[k] for c in self.pending]) for k in self.pending[0]}
        now = {k: v[:rows] for k, v in merged.items()}
        rest = {k: v[rows:] for k, v in merged.items()}
        self.pending = [rest] if len(rest[TOKEN_COLUMN]) else []
        self.pending_rows -= rows
        shard_dir = self.tmp / f"shard_{len(self.shard_dirs):05d}"
        with quiet_datasets():
            Dataset.from_dict(now, features=self.features).save_to_disk(
                str(shard_dir), num_shards=1
            )
        self.shard_dirs.append(shard_dir)
        self.shard_rows.append(rows)

    def finish(self) -> list[ShardInfo]:
        """Write the last shard and consolidate all shards into `path`, as SAELens does."""
        if self.pending_rows:
            self._flush(self.pending_rows)
        if not self.shard_dirs:
            shutil.rmtree(self.tmp)
            raise StoreError("No sequences were written: the token set is empty.")
        n = len(self.shard_dirs)
        shards, files = [], []
        for i, (shard_dir, rows) in enumerate(zip(self.shard_dirs, self.shard_rows)):
            state = json.loads((shard_dir / "state.json").read_text())
            (data_file,) = state["_data_files"]
            name = f"data-{i:05d}-of-{n:05d}.arrow"
            shutil.move(str(shard_dir / data_file["filename"]), str(self.path / name))
            files.append({"filename": name})
            shards.append(ShardInfo(file=name, rows=rows, bytes=(self.path / name).stat().st_size))
        shutil.move(
            str(self.shard_dirs[0] / "dataset_info.json"), str(self.path / "dataset_info.json")
        )
        fingerprint = hashlib.sha256(json.dumps(files).encode() + uuid.uuid4().bytes).hexdigest()
        state = {
            "_data_files": files,
            "_fingerprint": fingerprint[:16],
            "_format_columns": None,
            "_format_kwargs": {},
            "_format_type": None,
            "_output_all_columns": False,
            "_split": None,
        }
        atomic_write_json(self.path / "state.json", state)
        shutil.rmtree(self.tmp)
        return shards

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


def check_target(path: Path, overwrite: bool) -> None:
    """Refuse to replace a non-empty directory unless `overwrite`, and never one that is not a
    store (so `overwrite=True` cannot delete a user's files)."""
    if path.exists() and any(path.iterdir()):
        if not overwrite:
            raise StoreError(
                f"{path} already exists and is not empty; pass overwrite=True to replace it, "
                "or open it with ActivationStore.open."
            )
        if not (path / MANIFEST).is_file():
            raise StoreError(
                f"Refusing to overwrite {path}: it is not an activation store (no {MANIFEST})."
            )


@torch.no_grad()
def build_store(
    model: torch.nn.Module,
    tokens: Int[Tensor, "n_seq pos"],
    hooks: Sequence[str],
    path: Path,
    batch_size: int,
    shard_sequences: int,
    dtype: str,
    metadata: dict[str, Any] | None,
    overwrite: bool,
    progress: bool,
) -> None:
    """Run `model` once over `tokens` and write its activations at `hooks` as a store at `path`
    (see `ActivationStore.build`)."""
    hooks = list(dict.fromkeys(hooks))
    if not hooks:
        raise ValueError("ActivationStore.build needs at least one hook name.")
    if tokens.ndim != 2 or tokens.shape[0] == 0 or tokens.shape[1] == 0:
        raise StoreError(
            "No sequences were written: the token set is empty (tokens must be [n_seq >= 1, "
            f"pos >= 1], got shape {tuple(tokens.shape)})."
        )
    hook_dict = getattr(model, "hook_dict", {})
    for name in hooks:
        if name not in hook_dict:
            from tl_codebook.hooks.model import unknown_hook_error

            raise unknown_hook_error(name, hook_dict)
    check_dtype(dtype)
    check_target(path, overwrite)
    device = next(model.parameters()).device
    n_layers = int(getattr(getattr(model, "cfg", None), "n_layers", 0) or 0)
    stop = stop_layer(hooks, n_layers) if n_layers else None
    seen: dict[str, Tensor] = {}

    def keep(act: Tensor, hook: Any) -> None:
        seen[hook.name] = act.detach()

    shapes: dict[str, list[int]] = {}
    was_training = model.training
    model.eval()
    try:
        with atomic_directory(path) as temp:
            writer: ShardWriter | None = None
            bar = tqdm(
                total=tokens.shape[0], desc="caching activations", disable=not progress, unit="seq"
            )
            with model.hooks(fwd_hooks=[(h, keep) for h in hooks]):  # type: ignore[operator]
                for batch in tokens.split(batch_size):
                    seen.clear()
                    model(batch.to(device), stop_at_layer=stop)
                    if writer is None:
                        shapes = {h: list(seen[h].shape[2:]) for h in hooks}
                        writer = ShardWriter(temp, shapes, tokens.shape[1], dtype, shard_sequences)
                    writer.add(batch, seen)
                    bar.update(batch.shape[0])
            bar.close()
            assert writer is not None
            manifest = StoreManifest(
                model_name=model_name_of(model),
                model_fingerprint=model_fingerprint(model),
                hooks=shapes,
                dtype=dtype,
                context_size=int(tokens.shape[1]),
                n_sequences=int(tokens.shape[0]),
                shards=writer.finish(),
                metadata=dict(metadata or {}),
            )
            atomic_write_json(temp / MANIFEST, manifest.to_dict())
    finally:
        model.train(was_training)


def write_store(
    path: Path,
    activations: Mapping[str, Float[Tensor, "n_seq pos ..."]],
    tokens: Int[Tensor, "n_seq pos"],
    model_name: str,
    model_fingerprint: str,
    shard_sequences: int,
    dtype: str,
    metadata: dict[str, Any] | None,
    overwrite: bool,
) -> None:
    """Write given activations as a store at `path` (see `ActivationStore.write`)."""
    if not activations:
        raise ValueError("ActivationStore.write needs activations for at least one hook.")
    for hook, act in activations.items():
        if tuple(act.shape[:2]) != tuple(tokens.shape):
            raise ValueError(
                f"Activations at {hook!r} have shape {tuple(act.shape)}; their first two "
                f"dimensions must be the tokens' (n_seq, pos) = {tuple(tokens.shape)}."
            )
    if tokens.ndim != 2 or tokens.shape[0] == 0:
        raise StoreError("No sequences were written: the token set is empty.")
    check_dtype(dtype)
    check_target(path, overwrite)
    shapes = {h: list(a.shape[2:]) or [1] for h, a in activations.items()}
    with atomic_directory(path) as temp:
        writer = ShardWriter(temp, shapes, tokens.shape[1], dtype, shard_sequences)
        writer.add(tokens, activations)
        manifest = StoreManifest(
            model_name=model_name,
            model_fingerprint=model_fingerprint,
            hooks=shapes,
            dtype=dtype,
            context_size=int(tokens.shape[1]),
            n_sequences=int(tokens.shape[0]),
            shards=writer.finish(),
            metadata=dict(metadata or {}),
        )
        atomic_write_json(temp / MANIFEST, manifest.to_dict())
