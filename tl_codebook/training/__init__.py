"""Training codebooks: on a frozen model or jointly with it, resumable and data-parallel."""

from tl_codebook.training.config import TrainConfig
from tl_codebook.training.sites import SiteSpec, parse_site, resolve_sites
from tl_codebook.training.trainer import TrainingDivergedError, TrainResult, train_codebooks

__all__ = [
    "SiteSpec",
    "TrainConfig",
    "TrainResult",
    "TrainingDivergedError",
    "parse_site",
    "resolve_sites",
    "train_codebooks",
]
