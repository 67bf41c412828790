"""Reading an activation store: `ActivationStore` opens a directory, checks every shard against
the manifest (and the model's fingerprint), and reads memory-mapped Arrow shards as zero-copy numpy
views. Building (`writer`), training batches (`batcher`) and SAELens' reader (`saelens_adapter`)
live in their own modules; the class is the one entry point to all of them.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from jaxtyping import Float, Int
from torch import Tensor

from tl_codebook.comparisons.store.fingerprint import model_fingerprint, model_name_of
from tl_codebook.comparisons.store.manifest import (
    MANIFEST,
    TOKEN_COLUMN,
    StoreError,
    StoreManifest,
)
from tl_codebook.configs import did_you_mean


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

    Activations are stored flattened per token: `[n_seq, context_size, d_in]` per hook, with
    `hook_shape` giving the model's own per-token shape (e.g. `[n_heads, d_head]`).

    Args:
        path: the store directory.
        manifest: its parsed manifest. Use `build`, `write` or `open` rather than this
            constructor.
    """

    def __init__(self, path: str | Path, manifest: StoreManifest):
        self.path = Path(path)
        self.manifest = manifest
        self._blocks: list[dict[str, np.ndarray]] | None = None

    # -- building -----------------------------------------------------------------------------

    @classmethod
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
        after the last block a hook sits in. The directory is built under a temporary name and
        swapped in whole: a killed build leaves the previous store (or nothing) behind.

        Args:
            model: the model to run.
            tokens: integer token ids `[n_seq, pos]`.
            hooks: the hook names whose activations to store.
            path: the store directory.
            batch_size: sequences per forward pass.
            shard_sequences: sequences per Arrow shard file.
            dtype: the stored float type: "float32", "float16" or "float64" (Arrow has no
                bfloat16).
            metadata: free-form JSON saved in the manifest.
            overwrite: replace an existing store at `path`.
            progress: show a progress bar.

        Returns:
            The new store, opened.

        Raises:
            ValueError: for no hooks, or an unknown `dtype`.
            UnknownHookError: for a hook the model does not have.
            StoreError: for an empty token set, a non-empty `path` without `overwrite`, or a
                `path` that is not a store.
        """
        from tl_codebook.comparisons.store.writer import build_store

        path = Path(path)
        build_store(
            model,
            tokens,
            hooks,
            path,
            batch_size,
            shard_sequences,
            dtype,
            metadata,
            overwrite,
            progress,
        )
        return cls.open(path)

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
        """Store given activations (`[n_seq, pos, ...]` per hook) with their token ids.

        For activations computed elsewhere; `model_name` and `model_fingerprint` are recorded
        (the fingerprint is what `open(model=...)` checks). Other arguments as in `build`.

        Raises:
            ValueError: for no activations, activations whose first two axes are not the
                tokens' `(n_seq, pos)`, or an unknown `dtype`.
            StoreError: for an empty token set, or a non-empty `path` without `overwrite`.
        """
        from tl_codebook.comparisons.store.writer import write_store

        path = Path(path)
        write_store(
            path,
            activations,
            tokens,
            model_name,
            model_fingerprint,
            shard_sequences,
            dtype,
            metadata,
            overwrite,
        )
        return cls.open(path)

    # -- opening and checking -------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        path: str | Path,
        model: torch.nn.Module | None = None,
        hooks: Sequence[str] | None = None,
    ) -> ActivationStore:
        """Open a store, checking every shard against the manifest (and `model`/`hooks` if given).

        Raises:
            StoreError: for a missing or invalid manifest, no shards, a missing, empty or
                truncated shard, a sequence count that differs from the manifest's, a store
                built for another model than `model`, or a hook in `hooks` it does not hold.
        """
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
        """Check that the store was built from `model` (weights fingerprint) and holds `hooks`.

        Raises:
            StoreError: for another model's store, or a hook it does not hold.
        """
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
        """Return `hook_name` if the store holds it.

        Raises:
            StoreError: for a hook the store does not hold (naming the ones it does).
        """
        if hook_name not in self.manifest.hooks:
            raise StoreError(
                f"The store at {self.path} has no activations at {hook_name!r}; it holds "
                f"{', '.join(self.manifest.hooks)}." + did_you_mean(hook_name, self.manifest.hooks)
            )
        return hook_name

    # -- sizes ----------------------------------------------------------------------------------

    @property
    def hooks(self) -> list[str]:
        """The hook names the store holds activations for."""
        return list(self.manifest.hooks)

    @property
    def n_sequences(self) -> int:
        """Sequences stored."""
        return self.manifest.n_sequences

    @property
    def context_size(self) -> int:
        """Tokens per sequence."""
        return self.manifest.context_size

    @property
    def n_tokens(self) -> int:
        """All stored tokens: `n_sequences * context_size`."""
        return self.manifest.n_tokens

    def d_in(self, hook_name: str) -> int:
        """The flattened activation width per token at `hook_name`.

        Raises:
            StoreError: for a hook the store does not hold (naming the ones it does).
        """
        return self.manifest.d_in(self.check_hook(hook_name))

    def hook_shape(self, hook_name: str) -> tuple[int, ...]:
        """The per-token activation shape at the hook in the model (before flattening).

        Raises:
            StoreError: for a hook the store does not hold (naming the ones it does).
        """
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
        """(token ids, activations) for `batch_sequences` sequences at a time, in store order.

        Yields int64 token ids `[batch, pos]` and float32 activations `[batch, pos, d_in]`
        (the last batch may be shorter), for the first `limit` sequences (None: all).

        Raises:
            StoreError: for a hook the store does not hold (naming the ones it does).
        """
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
        """The activations at `hook_name` (float32, in memory) for the first `limit` sequences.

        Returns:
            `[n_seq, pos, d_in]`, `n_seq` the store's sequences or `limit`, whichever is fewer.

        Raises:
            StoreError: for a hook the store does not hold (naming the ones it does).
        """
        return torch.cat([a for _, a in self.iter_sequences(hook_name, 1024, limit)])

    def count_tokens(self, exclude_token_ids: Sequence[int] = ()) -> int:
        """Tokens whose id is not in `exclude_token_ids`."""
        excluded = np.asarray(sorted(set(int(t) for t in exclude_token_ids)), dtype=np.int64)
        return int(sum((~np.isin(b[TOKEN_COLUMN], excluded)).sum() for b in self._load_blocks()))

    def sample(
        self,
        hook_name: str,
        n_tokens: int,
        seed: int = 0,
        exclude_token_ids: Sequence[int] = (),
    ) -> Float[Tensor, "n d_in"]:
        """Up to `n_tokens` distinct random token activations (float32), e.g. for k-means init
        (all usable tokens, shuffled, when the store has fewer).

        Returns:
            `[n, d_in]` float32 rows, `n = min(n_tokens, usable tokens)`.

        Raises:
            StoreError: for a hook the store does not hold, or no token left after
                `exclude_token_ids`.
        """
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
        """Token activations `[batch_size, d_in]` (float32) for training; see `batcher.batches`.

        Tokens in `exclude_token_ids` are skipped. With `shuffle`, each epoch visits the shards
        in a seeded order and shuffles within a buffer of about `buffer_tokens`; epochs repeat
        until `n_tokens` (default: one epoch, whole batches) are yielded. The same arguments
        always give the same batches.

        Raises:
            StoreError: for a hook the store does not hold, or no token left after
                `exclude_token_ids` (when iteration starts).
            ValueError: for `batch_size < 1`, or a default one epoch with fewer usable tokens
                than `batch_size` (when iteration starts).
        """
        from tl_codebook.comparisons.store.batcher import token_batches

        self.check_hook(hook_name)
        return token_batches(
            self, hook_name, batch_size, n_tokens, seed, exclude_token_ids, shuffle, buffer_tokens
        )

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
        """SAELens' own `ActivationsStore` reading this directory (see `saelens_adapter`).

        It shuffles with SAELens' mixing buffer (not the seeded order of `batches`); use it to
        train with SAELens' loader, or to check that SAELens reads the very tensors stored.

        Raises:
            StoreError: for a hook the store does not hold.
        """
        from tl_codebook.comparisons.store.saelens_adapter import saelens_activations_store

        return saelens_activations_store(
            self,
            hook_name,
            train_batch_size_tokens,
            total_training_tokens,
            model,
            n_sequences_per_batch,
            n_batches_in_buffer,
            exclude_token_ids,
            device,
        )
