"""Codebooks inside TransformerLens models, and interventions on their codes."""

from tl_codebook.hooks.interventions import (
    ablate_codes,
    force_codes,
    force_codes_hook,
    insert_codes,
)
from tl_codebook.hooks.model import (
    HookedCodebookTransformer,
    UnknownHookError,
    attach_codebook,
    codebooks_disabled,
    codebooks_of,
    detach_codebook,
)

__all__ = [
    "HookedCodebookTransformer",
    "UnknownHookError",
    "ablate_codes",
    "attach_codebook",
    "codebooks_disabled",
    "codebooks_of",
    "detach_codebook",
    "force_codes",
    "force_codes_hook",
    "insert_codes",
]
