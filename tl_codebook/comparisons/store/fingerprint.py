"""Which model a store belongs to: `tl_codebook.fingerprint`, re-exported where the store reads it."""

from tl_codebook.fingerprint import model_fingerprint, model_name_of

__all__ = ["model_fingerprint", "model_name_of"]
