"""What a TokFSM run measures of a trained model: how well it follows the FSM (sampled and exact
transition accuracy, held-out loss), how many codes are dead, and the best loss any model can get.

The measures themselves live in `tl_codebook.fsm.metrics`; this module picks the ones the run
reports and fixes their seeds, so a rerun measures the same thing.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor

from tl_codebook.fsm.config import ExperimentConfig
from tl_codebook.fsm.machine import FSM
from tl_codebook.fsm.metrics import (
    first_transition_accuracy_exact,
    next_token_loss,
    sample_transition_accuracy,
)
from tl_codebook.hooks.model import HookedCodebookTransformer


def evaluate_lm(
    model: HookedCodebookTransformer,
    fsm: FSM,
    held_out: Int[Tensor, "batch pos"],
    config: ExperimentConfig,
) -> dict[str, Any]:
    """Transition accuracy of `config.n_samples` sampled continuations (temperature 1, from BOS
    and one state; seeded by `config.seed`), the exact first-transition accuracy and the
    held-out next-token loss."""
    sampled = sample_transition_accuracy(
        model,
        fsm,
        n_samples=config.n_samples,
        prompt_states=1,
        seq_len=config.seq_len,
        temperature=1.0,
        seed=config.seed + 1,
    )
    return {
        "transition_accuracy": sampled.accuracy,
        "first_transition_accuracy": sampled.first_transition_accuracy,
        "first_transition_accuracy_exact": first_transition_accuracy_exact(model, fsm),
        "next_token_loss": next_token_loss(model, held_out),
        "n_transitions": sampled.n_transitions,
    }


@torch.no_grad()
def dead_code_fraction(model: HookedCodebookTransformer, tokens: Int[Tensor, "batch pos"]) -> float:
    """The fraction of codes (over all codebooks) that no position of `tokens` chooses."""
    if not model.codebooks:
        raise ValueError("dead_code_fraction needs a model with codebooks; it has none.")
    for cb in model.codebooks.values():
        cb.reset_stats()
    model(tokens.to(next(model.parameters()).device))
    return sum(cb.dead_fraction for cb in model.codebooks.values()) / len(model.codebooks)


def loss_floor(fsm: FSM, seq_len: int) -> float:
    """The task's entropy per predicted token of a `seq_len`-token walk: the best possible loss.

    The first state costs log N, each later one log E; a trailing partial state costs the entropy
    of its digits over a random successor (averaged over states with equal weight: approximate).
    """
    d, n_digits = fsm.digits_per_state, seq_len - 1
    n_complete, partial = divmod(n_digits, d)
    if n_complete == 0:
        return math.log(fsm.n_states) / d
    total = math.log(fsm.n_states) + (n_complete - 1) * math.log(fsm.n_edges)
    if partial:
        successors = fsm.trajectory_to_tokens(fsm.transitions, add_bos=False)
        successors = successors.view(fsm.n_states, fsm.n_edges, d)[..., :partial]
        entropy = 0.0
        for prefixes in successors:
            _, counts = prefixes.unique(dim=0, return_counts=True)
            p = counts.double() / fsm.n_edges
            entropy -= float((p * p.log()).sum())
        total += entropy / fsm.n_states
    return total / n_digits
