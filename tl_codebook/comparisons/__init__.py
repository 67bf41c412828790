"""Codebooks compared with sparse autoencoders (SAELens) on one shared activation store.

Importing this package registers the SAELens architecture "codebook" (see `saelens`). The
side-by-side comparison (`store`, `methods`, `metrics`, `compare`, `report`) loads on first use;
it takes a `tl_codebook.tasks.Task` for concept labels and steering and imports no task itself.
The comparison with circuit-discovery methods is the sub-package `circuits`.
"""

from typing import Any

from tl_codebook.comparisons.saelens import (
    CodebookSAE,
    CodebookSAEConfig,
    CodebookTrainingSAE,
    CodebookTrainingSAEConfig,
    codebook_to_sae,
    sae_to_codebook,
)

_LAZY = {
    "ActivationStore": "tl_codebook.comparisons.store",
    "StoreError": "tl_codebook.comparisons.store",
    "MethodSpec": "tl_codebook.comparisons.methods",
    "TrainingConfig": "tl_codebook.comparisons.methods",
    "TrainedMethod": "tl_codebook.comparisons.methods",
    "as_method": "tl_codebook.comparisons.methods",
    "train_method": "tl_codebook.comparisons.methods",
    "EvalConfig": "tl_codebook.comparisons.metrics",
    "evaluate_method": "tl_codebook.comparisons.metrics",
    "ComparisonConfig": "tl_codebook.comparisons.compare",
    "ComparisonResult": "tl_codebook.comparisons.compare",
    "run_comparison": "tl_codebook.comparisons.compare",
}


def __getattr__(name: str) -> Any:
    """The comparison's public names, imported on first access (keeps `import tl_codebook` light)."""
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    module = importlib.import_module(_LAZY[name])
    return getattr(module, "run" if name == "run_comparison" else name)


__all__ = [
    "ActivationStore",
    "CodebookSAE",
    "CodebookSAEConfig",
    "CodebookTrainingSAE",
    "CodebookTrainingSAEConfig",
    "ComparisonConfig",
    "ComparisonResult",
    "EvalConfig",
    "MethodSpec",
    "StoreError",
    "TrainedMethod",
    "TrainingConfig",
    "as_method",
    "codebook_to_sae",
    "evaluate_method",
    "run_comparison",
    "sae_to_codebook",
    "train_method",
]
