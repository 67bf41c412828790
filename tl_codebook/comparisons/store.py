"""`ActivationStore`: a model's activations at chosen hooks, computed once, memory-mapped from disk.
Written in SAELens' cached-activations layout, so codebooks and SAEs train on the very same tensors.

Layout (one directory): `data-XXXXX-of-YYYYY.arrow` shards, `dataset_info.json` and `state.json`
(a Hugging Face `datasets` Dataset, as SAELens' `CacheActivationsRunner` writes it: one
`Array2D(context_size, d_in)` column per hook, named by the hook, plus `token_ids`), and our
manifest `tl_codebook_store.json` (model name and weight fingerprint, hooks and their per-token
shapes, dtype, counts, each shard's file, rows and bytes). `datasets.load_from_disk(path)` and
SAELens' `ActivationsStore(cached_activations_path=path, ...)` read it as is
(`ActivationStore.saelens_activations_store` builds the latter); we read the Arrow shards directly
as zero-copy numpy views of the memory map.

A `[..., n_heads, d_head]` activation (e.g. `attn.hook_z`) is stored flattened to
`d_in = n_heads * d_head`, as SAELens does; the manifest keeps its shape for splicing back.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import random
import shutil
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

MANIFEST = "tl_codebook_store.json"
FORMAT_NAME = "tl_codebook.activation_store"
FORMAT_VERSION = 1
DTYPES = ("float32", "float16", "float64")
"""Arrow has no bfloat16; SAELens' cache uses these names too."""
TOKEN_COLUMN = "token_ids"


class StoreError(ValueError):
    """An activation store that is missing, truncated, corrupted, or built for something else."""


def model_fingerprint(model: torch.nn.Module) -> str:
    """A short hash of a model's weights: names, shapes, dtypes and a strided sample of values.

    Cheap for large models (at most 4096 values per tensor are read), yet two differently trained
    models practically never collide. Codebook parameters (`*.codes`) are left out, so a model
    with codebooks attached has its base model's fingerprint.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if name.endswith(".codes") or not isinstance(tensor, Tensor):
            continue
        flat = tensor.detach().reshape(-1)
        step = max(1, flat.numel() // 4096)
        sample = flat[::step][:4096].to("cpu", torch.float64).numpy()
        digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
        digest.update(np.ascontiguousarray(sample).tobytes())
    return digest.hexdigest()[:16]


def model_name_of(model: torch.nn.Module) -> str:
    cfg = getattr(model, "cfg", None)
    return str(getattr(cfg, "model_name", None) or type(model).__name__)


@dataclass
class ShardInfo:
    file: str
    rows: int
    bytes: int

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class StoreManifest:
    """What a store holds; saved as `tl_codebook_store.json` next to the Arrow shards."""

    model_name: str
    model_fingerprint: str
    hooks: dict[str, list[int]]
    """Hook name -> per-token activation shape at the hook (e.g. [64], or [4, 16] at hook_z)."""
    dtype: str
    context_size: int
    n_sequences: int
    shards: list[ShardInfo] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)
    """Free-form, JSON-ready (e.g. the TokFSM machine the tokens were drawn from)."""

    @property
    def n_tokens(self) -> int:
        return self.n_sequences * self.context_size

    def d_in(self, hook_name: str) -> int:
        return int(np.prod(self.hooks[hook_name]))

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data.update(format=FORMAT_NAME, version=FORMAT_VERSION, n_tokens=self.n_tokens)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StoreManifest:
        if data.get("format") != FORMAT_NAME or data.get("version") != FORMAT_VERSION:
            raise StoreError(
                f"Not an activation store manifest: expected format={FORMAT_NAME!r} version="
                f"{FORMAT_VERSION}, got format={data.get('format')!r} version={data.get('version')!r}."
            )
        names = {f.name for f in dataclasses.fields(cls)}
        missing = sorted(names - {"metadata", "shards"} - set(data))
        if missing:
            raise StoreError(f"The store manifest is missing key(s): {', '.join(missing)}.")
        kwargs = {k: v for k, v in data.items() if k in names}
        kwargs["shards"] = [ShardInfo(**s) for s in data.get("shards", [])]
        kwargs["hooks"] = {h: [int(d) for d in shape] for h, shape in data["hooks"].items()}
        return cls(**kwargs)


def _check_dtype(dtype: str) -> str:
    if dtype not in DTYPES:
        raise ValueError(f"Unknown store dtype {dtype!r}; valid choices are {', '.join(DTYPES)}.")
    return dtype


def _stop_layer(hooks: Sequence[str], n_layers: int) -> int | None:
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
def _quiet_datasets() -> Iterator[None]:
    """No `datasets` progress bar per shard (our own bar covers the whole build)."""
    import datasets.utils as ds_utils

    was_disabled = ds_utils.are_progress_bars_disabled()
    ds_utils.disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            ds_utils.enable_progress_bars()


class _ShardWriter:
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

        self.path, self.tmp = path, path / f".tmp_shards_{uuid.uuid4().hex[:8]}"
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
        with _quiet_datasets():
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
        (self.path / "state.json").write_text(json.dumps(state, indent=2))
        shutil.rmtree(self.tmp)
        return shards

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


def _arrow_values(column: pa.Array) -> pa.Array:
    """The flat values of a (nested) list column: Array2D extension or fixed-size list."""
    array = column.storage if isinstance(column, pa.ExtensionArray) else column
    while pa.types.is_list(array.type) or pa.types.is_fixed_size_list(array.type):
        array = array.flatten()
    return array


class ActivationStore:
    """Activations of one model at chosen hooks over a fixed token set, on disk.

    Build it once (`ActivationStore.build(model, tokens, hooks, path)`, or `write` from tensors),
    reopen it anywhere (`ActivationStore.open(path, model=..., hooks=...)` checks it was built for
    that model and has those hooks), and read it as sequences (`activations`, `tokens`,
    `iter_sequences`) or as shuffled token batches for training (`batches`).
    """

    def __init__(self, path: str | Path, manifest: StoreManifest):
        self.path = Path(path)
        self.manifest = manifest
        self._blocks: list[dict[str, np.ndarray]] | None = None

    # -- building -----------------------------------------------------------------------------

    @classmethod
    @torch.no_grad()
    def build(
        cls,
        model: torch.nn.Module,
        tokens: Int[Tensor, "n_seq pos"],
        hooks: Sequence[str],
        path: str | Path,
        batch_size: int = 64,
        shard_sequences: int = 1024,
        dtype: str = "float32",
        metadata: dict[str, Any] | None = None,
        overwrite: bool = False,
        progress: bool = True,
    ) -> ActivationStore:
        """Run `model` once over `tokens` and store its activations at `hooks` under `path`.

        The model runs as it is (codebooks attached to it act as usual; wrap the call in
        `codebooks_disabled(model)` for the base model's activations). The forward pass stops
        after the last block a hook sits in.
        """
        hooks = list(dict.fromkeys(hooks))
        if not hooks:
            raise ValueError("ActivationStore.build needs at least one hook name.")
        hook_dict = getattr(model, "hook_dict", {})
        for name in hooks:
            if name not in hook_dict:
                from tl_codebook.hooks.model import unknown_hook_error

                raise unknown_hook_error(name, hook_dict)
        device = next(model.parameters()).device
        n_layers = int(getattr(getattr(model, "cfg", None), "n_layers", 0) or 0)
        stop = _stop_layer(hooks, n_layers) if n_layers else None
        seen: dict[str, Tensor] = {}

        def keep(act: Tensor, hook: Any) -> None:
            seen[hook.name] = act.detach()

        writer: _ShardWriter | None = None
        path = cls._prepare_directory(Path(path), overwrite)
        shapes: dict[str, list[int]] = {}
        was_training = model.training
        model.eval()
        try:
            bar = tqdm(
                total=tokens.shape[0], desc="caching activations", disable=not progress, unit="seq"
            )
            with model.hooks(fwd_hooks=[(h, keep) for h in hooks]):  # type: ignore[operator]
                for batch in tokens.split(batch_size):
                    seen.clear()
                    model(batch.to(device), stop_at_layer=stop)
                    if writer is None:
                        shapes = {h: list(seen[h].shape[2:]) for h in hooks}
                        writer = _ShardWriter(
                            path, shapes, tokens.shape[1], _check_dtype(dtype), shard_sequences
                        )
                    writer.add(batch, seen)
                    bar.update(batch.shape[0])
            bar.close()
            if writer is None:
                raise StoreError("No sequences were written: the token set is empty.")
            shards = writer.finish()
        except BaseException:
            if writer is not None:
                writer.abort()
            raise
        finally:
            model.train(was_training)
        manifest = StoreManifest(
            model_name=model_name_of(model),
            model_fingerprint=model_fingerprint(model),
            hooks=shapes,
            dtype=dtype,
            context_size=int(tokens.shape[1]),
            n_sequences=int(tokens.shape[0]),
            shards=shards,
            metadata=dict(metadata or {}),
        )
        return cls._finish(path, manifest)

    @classmethod
    def write(
        cls,
        path: str | Path,
        activations: Mapping[str, Float[Tensor, "n_seq pos ..."]],
        tokens: Int[Tensor, "n_seq pos"],
        model_name: str,
        model_fingerprint: str,
        shard_sequences: int = 1024,
        dtype: str = "float32",
        metadata: dict[str, Any] | None = None,
        overwrite: bool = False,
    ) -> ActivationStore:
        """Store given activations (`[n_seq, pos, ...]` per hook) with their token ids."""
        if not activations:
            raise ValueError("ActivationStore.write needs activations for at least one hook.")
        for hook, act in activations.items():
            if tuple(act.shape[:2]) != tuple(tokens.shape):
                raise ValueError(
                    f"Activations at {hook!r} have shape {tuple(act.shape)}; their first two "
                    f"dimensions must be the tokens' (n_seq, pos) = {tuple(tokens.shape)}."
                )
        path = cls._prepare_directory(Path(path), overwrite)
        shapes = {h: list(a.shape[2:]) or [1] for h, a in activations.items()}
        writer = _ShardWriter(path, shapes, tokens.shape[1], _check_dtype(dtype), shard_sequences)
        try:
            writer.add(tokens, activations)
            shards = writer.finish()
        except BaseException:
            writer.abort()
            raise
        manifest = StoreManifest(
            model_name=model_name,
            model_fingerprint=model_fingerprint,
            hooks=shapes,
            dtype=dtype,
            context_size=int(tokens.shape[1]),
            n_sequences=int(tokens.shape[0]),
            shards=shards,
            metadata=dict(metadata or {}),
        )
        return cls._finish(path, manifest)

    @staticmethod
    def _prepare_directory(path: Path, overwrite: bool) -> Path:
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
            shutil.rmtree(path)
        path.mkdir(parents=True, exist_ok=True)
        return path

    @classmethod
    def _finish(cls, path: Path, manifest: StoreManifest) -> ActivationStore:
        tmp = path / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps(manifest.to_dict(), indent=2))
        tmp.replace(path / MANIFEST)
        return cls.open(path)

    # -- opening and checking -------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        path: str | Path,
        model: torch.nn.Module | None = None,
        hooks: Sequence[str] | None = None,
    ) -> ActivationStore:
        """Open a store, checking every shard against the manifest (and `model`/`hooks` if given)."""
        path = Path(path)
        manifest_path = path / MANIFEST
        if not manifest_path.is_file():
            raise StoreError(
                f"{path} is not an activation store: {MANIFEST} is missing"
                + (" (the directory does not exist)." if not path.exists() else ".")
            )
        try:
            manifest = StoreManifest.from_dict(json.loads(manifest_path.read_text()))
        except json.JSONDecodeError as err:
            raise StoreError(f"{manifest_path} is not valid JSON: {err}.") from None
        if not manifest.shards:
            raise StoreError(f"The store at {path} lists no shards: it is empty.")
        for shard in manifest.shards:
            file = path / shard.file
            if not file.is_file():
                raise StoreError(f"Shard {shard.file} of the store at {path} is missing.")
            size = file.stat().st_size
            if size == 0 or shard.rows == 0:
                raise StoreError(f"Shard {shard.file} of the store at {path} is empty.")
            if size != shard.bytes:
                raise StoreError(
                    f"Shard {shard.file} of the store at {path} is truncated or was changed: it "
                    f"has {size} bytes, the manifest says {shard.bytes}."
                )
        if sum(s.rows for s in manifest.shards) != manifest.n_sequences:
            raise StoreError(
                f"The shards of the store at {path} hold {sum(s.rows for s in manifest.shards)} "
                f"sequences, the manifest says {manifest.n_sequences}."
            )
        store = cls(path, manifest)
        store.check_compatible(model=model, hooks=hooks)
        return store

    def check_compatible(
        self, model: torch.nn.Module | None = None, hooks: Sequence[str] | None = None
    ) -> None:
        """Raise StoreError unless the store was built from `model` and holds every hook asked."""
        m = self.manifest
        if model is not None:
            fingerprint = model_fingerprint(model)
            if fingerprint != m.model_fingerprint:
                raise StoreError(
                    f"The store at {self.path} was built for model {m.model_name!r} (weights "
                    f"fingerprint {m.model_fingerprint}), not for the model given "
                    f"({model_name_of(model)!r}, fingerprint {fingerprint}); rebuild the store "
                    "with this model."
                )
        for hook in hooks or ():
            self.check_hook(hook)

    def check_hook(self, hook_name: str) -> str:
        if hook_name not in self.manifest.hooks:
            close = difflib.get_close_matches(hook_name, list(self.manifest.hooks), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise StoreError(
                f"The store at {self.path} has no activations at {hook_name!r}; it holds "
                f"{', '.join(self.manifest.hooks)}.{hint}"
            )
        return hook_name

    # -- sizes ----------------------------------------------------------------------------------

    @property
    def hooks(self) -> list[str]:
        return list(self.manifest.hooks)

    @property
    def n_sequences(self) -> int:
        return self.manifest.n_sequences

    @property
    def context_size(self) -> int:
        return self.manifest.context_size

    @property
    def n_tokens(self) -> int:
        return self.manifest.n_tokens

    def d_in(self, hook_name: str) -> int:
        return self.manifest.d_in(self.check_hook(hook_name))

    def hook_shape(self, hook_name: str) -> tuple[int, ...]:
        """The per-token activation shape at the hook in the model (before flattening)."""
        return tuple(self.manifest.hooks[self.check_hook(hook_name)])

    def __repr__(self) -> str:
        m = self.manifest
        return (
            f"ActivationStore({str(self.path)!r}, model={m.model_name!r}, hooks={self.hooks}, "
            f"{m.n_sequences} x {m.context_size} tokens, {m.dtype})"
        )

    # -- reading --------------------------------------------------------------------------------

    def _load_blocks(self) -> list[dict[str, np.ndarray]]:
        """Zero-copy numpy views of every record batch of every shard (memory-mapped)."""
        if self._blocks is not None:
            return self._blocks
        m, blocks = self.manifest, []
        for shard in m.shards:
            file = self.path / shard.file
            try:
                table = pa.ipc.open_stream(pa.memory_map(str(file))).read_all()
            except (pa.ArrowInvalid, OSError) as err:
                raise StoreError(
                    f"Shard {shard.file} of the store at {self.path} cannot be read (truncated "
                    f"or corrupted?): {err}"
                ) from None
            if table.num_rows != shard.rows:
                raise StoreError(
                    f"Shard {shard.file} of the store at {self.path} holds {table.num_rows} "
                    f"sequences, the manifest says {shard.rows}."
                )
            missing = [c for c in [*m.hooks, TOKEN_COLUMN] if c not in table.column_names]
            if missing:
                raise StoreError(
                    f"Shard {shard.file} of the store at {self.path} lacks column(s) {missing}."
                )
            for batch in table.to_batches():
                rows = batch.num_rows
                if rows == 0:
                    continue
                block = {
                    TOKEN_COLUMN: _arrow_values(batch.column(TOKEN_COLUMN))
                    .to_numpy(zero_copy_only=True)
                    .reshape(rows, m.context_size)
                }
                for hook in m.hooks:
                    values = _arrow_values(batch.column(hook)).to_numpy(zero_copy_only=True)
                    block[hook] = values.reshape(rows, m.context_size, m.d_in(hook))
                blocks.append(block)
        self._blocks = blocks
        return blocks

    def tokens(self) -> Int[Tensor, "n_seq pos"]:
        """All token ids (int64), in store order."""
        return torch.from_numpy(
            np.concatenate([b[TOKEN_COLUMN] for b in self._load_blocks()]).astype(np.int64)
        )

    def iter_sequences(
        self, hook_name: str, batch_sequences: int = 64, limit: int | None = None
    ) -> Iterator[tuple[Int[Tensor, "batch pos"], Float[Tensor, "batch pos d_in"]]]:
        """(token ids, activations) for `batch_sequences` sequences at a time, in store order."""
        self.check_hook(hook_name)
        remaining = self.n_sequences if limit is None else min(limit, self.n_sequences)
        for block in self._load_blocks():
            for start in range(0, block[TOKEN_COLUMN].shape[0], batch_sequences):
                if remaining <= 0:
                    return
                n = min(batch_sequences, remaining)
                tok = block[TOKEN_COLUMN][start : start + n].astype(np.int64)
                act = np.array(block[hook_name][start : start + n], dtype=np.float32)
                remaining -= tok.shape[0]
                yield torch.from_numpy(tok), torch.from_numpy(act)

    def activations(
        self, hook_name: str, limit: int | None = None
    ) -> Float[Tensor, "n_seq pos d_in"]:
        """The activations at `hook_name` (float32, in memory) for the first `limit` sequences."""
        return torch.cat([a for _, a in self.iter_sequences(hook_name, 1024, limit)])

    def sample(
        self,
        hook_name: str,
        n_tokens: int,
        seed: int = 0,
        exclude_token_ids: Sequence[int] = (),
    ) -> Float[Tensor, "n d_in"]:
        """Up to `n_tokens` distinct random token activations (float32), e.g. for k-means init
        (all usable tokens, shuffled, when the store has fewer)."""
        n = min(n_tokens, self.count_tokens(exclude_token_ids))
        return next(
            self.batches(
                hook_name,
                batch_size=n,
                seed=seed,
                exclude_token_ids=exclude_token_ids,
                n_tokens=n,
                buffer_tokens=max(n, 2**20),
            )
        )

    def count_tokens(self, exclude_token_ids: Sequence[int] = ()) -> int:
        """Tokens whose id is not in `exclude_token_ids`."""
        excluded = np.asarray(sorted(set(int(t) for t in exclude_token_ids)), dtype=np.int64)
        return int(sum((~np.isin(b[TOKEN_COLUMN], excluded)).sum() for b in self._load_blocks()))

    def batches(
        self,
        hook_name: str,
        batch_size: int,
        n_tokens: int | None = None,
        seed: int = 0,
        exclude_token_ids: Sequence[int] = (),
        shuffle: bool = True,
        buffer_tokens: int = 2**20,
    ) -> Iterator[Float[Tensor, "batch d_in"]]:
        """Token activations `[batch_size, d_in]` (float32) for training, `n_tokens` in all.

        Tokens whose id is in `exclude_token_ids` (e.g. BOS) are skipped. With `shuffle`, each
        epoch visits the shards in a seeded random order and shuffles tokens within a buffer of
        about `buffer_tokens` (the whole store when it is smaller); epochs repeat until
        `n_tokens` (default: one epoch, rounded down to whole batches) have been yielded. The
        same arguments always give the same batches, so trainers given the same seed see the
        very same tensors in the same order.
        """
        self.check_hook(hook_name)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        blocks = self._load_blocks()
        excluded = np.asarray(sorted(set(int(t) for t in exclude_token_ids)), dtype=np.int64)
        kept = [~np.isin(b[TOKEN_COLUMN], excluded) for b in blocks]
        usable = int(sum(k.sum() for k in kept))
        if usable == 0:
            raise StoreError(
                f"The store at {self.path} has no tokens left after excluding token ids "
                f"{excluded.tolist()}."
            )
        total = (usable // batch_size) * batch_size if n_tokens is None else n_tokens
        if total < 1:
            raise ValueError(
                f"One epoch holds {usable} usable tokens, fewer than batch_size={batch_size}."
            )
        rng = np.random.default_rng(seed)
        py_rng = random.Random(seed)
        yielded = 0
        carry = np.empty((0, self.d_in(hook_name)), dtype=np.float32)
        while yielded < total:
            order = list(range(len(blocks)))
            if shuffle:
                py_rng.shuffle(order)
            pending: list[np.ndarray] = [carry]
            pending_rows = carry.shape[0]
            for position, i in enumerate(order):
                acts = blocks[i][hook_name][kept[i]]  # a copy, float dtype of the store
                pending.append(acts.astype(np.float32, copy=False))
                pending_rows += acts.shape[0]
                last = position == len(order) - 1
                if pending_rows < buffer_tokens and not last:
                    continue
                buffer = np.concatenate(pending)
                if shuffle:
                    buffer = buffer[rng.permutation(buffer.shape[0])]
                n_full = buffer.shape[0] // batch_size
                for j in range(n_full):
                    take = min(batch_size, total - yielded)
                    yield torch.from_numpy(buffer[j * batch_size : j * batch_size + take])
                    yielded += take
                    if yielded >= total:
                        return
                carry = buffer[n_full * batch_size :]
                pending, pending_rows = [carry], carry.shape[0]

    # -- SAELens --------------------------------------------------------------------------------

    def saelens_activations_store(
        self,
        hook_name: str,
        train_batch_size_tokens: int,
        total_training_tokens: int,
        model: torch.nn.Module | None = None,
        n_sequences_per_batch: int = 8,
        n_batches_in_buffer: int = 4,
        exclude_token_ids: Sequence[int] = (),
        device: str = "cpu",
    ) -> Any:
        """SAELens' own `ActivationsStore`, reading this directory as its cached activations.

        It shuffles with SAELens' mixing buffer (not our seeded order); use it to train with
        SAELens' loader, or to check that SAELens reads the very tensors we wrote.
        """
        from sae_lens.training.activations_store import ActivationsStore

        self.check_hook(hook_name)
        return ActivationsStore(
            model=model,  # type: ignore[arg-type] # not used when reading cached activations
            dataset=None,
            streaming=False,
            hook_name=hook_name,
            hook_head_index=None,
            context_size=self.context_size,
            d_in=self.d_in(hook_name),
            n_batches_in_buffer=n_batches_in_buffer,
            total_training_tokens=total_training_tokens,
            store_batch_size_prompts=n_sequences_per_batch,
            train_batch_size_tokens=train_batch_size_tokens,
            prepend_bos=False,
            normalize_activations="none",
            device=torch.device(device),
            dtype=self.manifest.dtype,
            cached_activations_path=str(self.path),
            exclude_special_tokens=torch.tensor(sorted(set(exclude_token_ids)), dtype=torch.long)
            if exclude_token_ids
            else None,
        )
