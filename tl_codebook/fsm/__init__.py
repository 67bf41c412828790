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

__all__ = [
    "FSM",
    "FSMConfig",
    "TokFSMDataset",
    "TransitionAccuracy",
    "determined_states",
    "first_transition_accuracy_exact",
    "next_token_loss",
    "sample_sequences",
    "sample_transition_accuracy",
    "transition_accuracy",
]
