"""What an activation store holds: its manifest (`tl_codebook_store.json`), format constants and
the one error type every store module raises.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tl_codebook.configs import check_choice

MANIFEST = "tl_codebook_store.json"
FORMAT_NAME = "tl_codebook.activation_store"
FORMAT_VERSION = 1
DTYPES = ("float32", "float16", "float64")
"""Arrow has no bfloat16; SAELens' cache uses these names too."""
TOKEN_COLUMN = "token_ids"


class StoreError(ValueError):
    """An activation store that is missing, truncated, corrupted, or built for something else.

    A `ValueError` (the CLI reports it as a one-line user error); also raised for a hook the
    store does not hold and for a build that would overwrite something that is not a store.
    """


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


def check_dtype(dtype: str) -> str:
    """Return `dtype` if a store can hold it (Arrow has no bfloat16), else a ValueError."""
    return check_choice("store dtype", dtype, DTYPES)
