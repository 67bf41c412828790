"""SAELens' own `ActivationsStore` reading one of our stores as its cached activations (the
directory is SAELens' layout), to train with SAELens' loader or to check it reads our tensors.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from tl_codebook.comparisons.store.reader import ActivationStore


def saelens_activations_store(
    store: ActivationStore,
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

    store.check_hook(hook_name)
    return ActivationsStore(
        model=model,  # type: ignore[arg-type] # not used when reading cached activations
        dataset=None,
        streaming=False,
        hook_name=hook_name,
        hook_head_index=None,
        context_size=store.context_size,
        d_in=store.d_in(hook_name),
        n_batches_in_buffer=n_batches_in_buffer,
        total_training_tokens=total_training_tokens,
        store_batch_size_prompts=n_sequences_per_batch,
        train_batch_size_tokens=train_batch_size_tokens,
        prepend_bos=False,
        normalize_activations="none",
        device=torch.device(device),
        dtype=store.manifest.dtype,
        cached_activations_path=str(store.path),
        exclude_special_tokens=torch.tensor(sorted(set(exclude_token_ids)), dtype=torch.long)
        if exclude_token_ids
        else None,
    )
