"""tl_codebook: codebook features (Tamkin et al. 2023) as first-class TransformerLens hook points."""

import tl_codebook.comparisons.saelens  # noqa: F401 - registers the SAELens architecture "codebook"
from tl_codebook.codebook import Codebook, CodebookConfig
from tl_codebook.hooks.interventions import ablate_codes, force_codes
from tl_codebook.hooks.model import (
    HookedCodebookTransformer,
    UnknownHookError,
    attach_codebook,
    codebooks_disabled,
    detach_codebook,
)
from tl_codebook.io import CodebookFileError, load_codebooks, save_codebooks

__version__ = "0.1.0"

__all__ = [
    "Codebook",
    "CodebookConfig",
    "CodebookFileError",
    "HookedCodebookTransformer",
    "UnknownHookError",
    "ablate_codes",
    "attach_codebook",
    "codebooks_disabled",
    "detach_codebook",
    "force_codes",
    "load_codebooks",
    "save_codebooks",
]
