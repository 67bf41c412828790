"""The TokFSM task of the paper: a random finite state machine written as digit tokens.

It gives a model with a known ground truth: which states exist and which transitions are valid.
"""

from tl_codebook.fsm.dataset import TokFSMDataset, determined_states
from tl_codebook.fsm.machine import FSM, FSMConfig
from tl_codebook.fsm.metrics import (
    TransitionAccuracy,
    first_transition_accuracy_exact,
    next_token_loss,
    sample_sequences,
    sample_transition_accuracy,
    transition_accuracy,
)

_LAZY = {
    # the experiment and its report pull in the trainer, matplotlib, ...: imported when first used
    "ExperimentConfig": "tl_codebook.fsm.config",
    "PRESETS": "tl_codebook.fsm.config",
    "run_experiment": "tl_codebook.fsm.experiment",
    "evaluate_interventions": "tl_codebook.fsm.steering",
    "intervention_divergence": "tl_codebook.fsm.divergence",
    "jensen_shannon": "tl_codebook.fsm.divergence",
    "next_state_distribution": "tl_codebook.fsm.divergence",
    "state_code_scores": "tl_codebook.fsm.steering",
    "steering_codes": "tl_codebook.fsm.steering",
    "summarize_state_codes": "tl_codebook.fsm.steering",
    "write_report": "tl_codebook.fsm.report",
    "TokFSMTask": "tl_codebook.fsm.task",
    "load_run": "tl_codebook.fsm.models",
}


def __getattr__(name: str):  # noqa: ANN202 - module-level lazy attribute
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "ExperimentConfig",
    "FSM",
    "FSMConfig",
    "PRESETS",
    "TokFSMDataset",
    "TokFSMTask",
    "TransitionAccuracy",
    "determined_states",
    "evaluate_interventions",
    "first_transition_accuracy_exact",
    "intervention_divergence",
    "jensen_shannon",
    "load_run",
    "next_state_distribution",
    "next_token_loss",
    "run_experiment",
    "sample_sequences",
    "sample_transition_accuracy",
    "state_code_scores",
    "steering_codes",
    "summarize_state_codes",
    "transition_accuracy",
    "write_report",
]
