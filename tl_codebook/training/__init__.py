"""Training codebooks: on a frozen model, on cached activations, or jointly with the model;
resumable and data-parallel. One trainer and one initialisation serve every caller."""

from tl_codebook.training.codebook_init import initialise_codebook
from tl_codebook.training.config import CODEBOOK_INITS, TrainConfig
from tl_codebook.training.sites import SiteSpec, parse_site, resolve_sites
from tl_codebook.training.trainer import (
    TrainingDivergedError,
    TrainResult,
    lr_factor,
    train_codebooks,
    train_codebooks_on_activations,
)

__all__ = [
    "CODEBOOK_INITS",
    "SiteSpec",
    "TrainConfig",
    "TrainResult",
    "TrainingDivergedError",
    "initialise_codebook",
    "lr_factor",
    "parse_site",
    "resolve_sites",
    "train_codebooks",
    "train_codebooks_on_activations",
]
