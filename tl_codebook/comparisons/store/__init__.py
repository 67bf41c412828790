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

Split by job: `fingerprint` (which model a store belongs to), `manifest` (what it holds),
`writer` (building it), `reader` (`ActivationStore`: opening and reading), `batcher` (training
batches), `saelens_adapter` (SAELens' reader over it).
"""

from tl_codebook.comparisons.store.fingerprint import model_fingerprint, model_name_of
from tl_codebook.comparisons.store.manifest import (
    DTYPES,
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST,
    TOKEN_COLUMN,
    ShardInfo,
    StoreError,
    StoreManifest,
)
from tl_codebook.comparisons.store.reader import ActivationStore

__all__ = [
    "DTYPES",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "MANIFEST",
    "TOKEN_COLUMN",
    "ActivationStore",
    "ShardInfo",
    "StoreError",
    "StoreManifest",
    "model_fingerprint",
    "model_name_of",
]
