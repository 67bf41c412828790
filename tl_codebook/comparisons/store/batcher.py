"""Training batches from an activation store: seeded, shuffled token activations, the same stream
for every method (same tokens, same batches, same order), excluded token ids skipped.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from tl_codebook.comparisons.store.manifest import TOKEN_COLUMN, StoreError

if TYPE_CHECKING:
    from tl_codebook.comparisons.store.reader import ActivationStore


def token_batches(
    store: ActivationStore,
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
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    blocks = store._load_blocks()
    excluded = np.asarray(sorted(set(int(t) for t in exclude_token_ids)), dtype=np.int64)
    kept = [~np.isin(b[TOKEN_COLUMN], excluded) for b in blocks]
    usable = int(sum(k.sum() for k in kept))
    if usable == 0:
        raise StoreError(
            f"The store at {store.path} has no tokens left after excluding token ids "
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
    carry = np.empty((0, store.d_in(hook_name)), dtype=np.float32)
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
