"""Codebooks compared with other interpretability methods: sparse autoencoders (SAELens), circuits.

Importing this package registers the SAELens architecture "codebook" (see `saelens`).
"""

from tl_codebook.comparisons.saelens import (
    CodebookSAE,
    CodebookSAEConfig,
    CodebookTrainingSAE,
    CodebookTrainingSAEConfig,
    codebook_to_sae,
    sae_to_codebook,
)

__all__ = [
    "CodebookSAE",
    "CodebookSAEConfig",
    "CodebookTrainingSAE",
    "CodebookTrainingSAEConfig",
    "codebook_to_sae",
    "sae_to_codebook",
]
