"""Codes against circuit-discovery methods: which heads and edges carry a task, scored one way.

- `task`: `CircuitTask`, what a method needs (an attention-only model, clean/corrupted prompt
  pairs, a differentiable metric, the true heads and edges if known) and the graph's names;
- `graph`: `CircuitGraph`, the patched runs (resample or mean ablation) every method shares;
- `methods`: `score_circuit` with codes, activation_patching, attribution_patching, eap,
  eap_ig, acdc and random;
- `scores`: ROC/PR AUC, precision/recall at the circuit's size, MIB's faithfulness CPR and CMD;
- `compare`: every method on a task, evaluated (`compare_methods`: the Python API for one's own
  model and task); `scaling`: cost against the number of heads; `report`: plots and index.html.

The tasks with known circuits live in `tl_codebook.circuit_tasks`; this package imports none.
Modules load on first use.
"""

from typing import Any

_LAZY = {
    "CircuitTask": "tl_codebook.comparisons.circuits.task",
    "model_heads": "tl_codebook.comparisons.circuits.task",
    "model_edges": "tl_codebook.comparisons.circuits.task",
    "CircuitGraph": "tl_codebook.comparisons.circuits.graph",
    "ABLATIONS": "tl_codebook.comparisons.circuits.graph",
    "METHODS": "tl_codebook.comparisons.circuits.methods",
    "MethodOptions": "tl_codebook.comparisons.circuits.methods",
    "CircuitScores": "tl_codebook.comparisons.circuits.methods",
    "score_circuit": "tl_codebook.comparisons.circuits.methods",
    "MethodResult": "tl_codebook.comparisons.circuits.compare",
    "FaithfulnessCurve": "tl_codebook.comparisons.circuits.compare",
    "compare_methods": "tl_codebook.comparisons.circuits.compare",
    "evaluate": "tl_codebook.comparisons.circuits.compare",
    "faithfulness_curve": "tl_codebook.comparisons.circuits.compare",
    "auroc_by_examples": "tl_codebook.comparisons.circuits.compare",
    "time_against_heads": "tl_codebook.comparisons.circuits.scaling",
    "roc_auc": "tl_codebook.comparisons.circuits.scores",
    "pr_auc": "tl_codebook.comparisons.circuits.scores",
    "precision_recall_at_k": "tl_codebook.comparisons.circuits.scores",
    "cpr_cmd": "tl_codebook.comparisons.circuits.scores",
    "FRACTIONS": "tl_codebook.comparisons.circuits.scores",
}


def __getattr__(name: str) -> Any:
    """The package's public names, imported on first access."""
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_LAZY[name]), name)


__all__ = sorted(_LAZY)
