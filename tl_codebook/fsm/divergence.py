"""The reference's intervention measure: how far a steered model's next-state distribution is
from the target state's, as a Jensen-Shannon divergence.

Steering success (`tl_codebook.fsm.steering`) samples one next state per prompt and asks whether
it follows the target; this measure needs no sampling. For each prompt it computes the exact
probability of every next state under the intervention (the product of its digits'
conditional probabilities, one forward pass per digit prefix, with the codes for "target, then
the digits so far" forced exactly as `generate_steered` forces them) and compares it with the
target's true next-state distribution (uniform over its out-edges). 0 bits: the model continues
exactly as the FSM does from the target; 1 bit: no next state the model writes is a successor
of the target. Probability the model puts on digit strings that are no state (a non-digit token,
or a value >= n_states) is one more outcome, "no state", which the target never has.
"""

from __future__ import annotations

from contextlib import ExitStack
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from tl_codebook.fsm.machine import FSM
from tl_codebook.hooks.model import HookedCodebookTransformer
from tl_codebook.tasks import checked_logits, evaluating

if TYPE_CHECKING:
    from tl_codebook.fsm.steering import SpecFor, SteeringSpec


def jensen_shannon(
    p: Float[Tensor, "*batch outcomes"], q: Float[Tensor, "*batch outcomes"]
) -> Float[Tensor, "*batch"]:
    """JS(p, q) in bits (in [0, 1]) along the last axis; rows must each sum to 1.

    `0 log 0` counts as 0, so outcomes that one side never has are handled exactly.
    """
    if p.shape != q.shape:
        raise ValueError(
            f"p and q must have the same shape, got {tuple(p.shape)} and {tuple(q.shape)}."
        )
    p, q = p.double(), q.double()
    m = (p + q) / 2

    def kl_to_m(x: Tensor) -> Tensor:
        terms = torch.where(x > 0, x * (x.clamp(min=1e-300) / m.clamp(min=1e-300)).log2(), 0.0)
        return terms.sum(dim=-1)

    return ((kl_to_m(p) + kl_to_m(q)) / 2).clamp(0.0, 1.0).float()


def target_distribution(
    fsm: FSM, targets: Int[Tensor, " batch"]
) -> Float[Tensor, "batch n_states_1"]:
    """The FSM's next-state distribution of each target (uniform over its out-edges), with a
    last, always-zero column for "no state"."""
    edges = fsm.transition_matrix[targets.cpu()].float()
    probs = edges / edges.sum(dim=-1, keepdim=True)
    return torch.cat([probs, torch.zeros(len(targets), 1)], dim=-1)


@torch.no_grad()
def next_state_distribution(
    model: HookedCodebookTransformer,
    fsm: FSM,
    prompts: Int[Tensor, "batch prompt_len"],
    target: int,
    spec_for: SpecFor | None,
) -> Float[Tensor, "batch n_states_1"]:
    """The exact probability of each next state after `prompts`, steering towards `target`.

    Digit j of the next state is read off the forward pass over prompt + the first j digits,
    with `spec_for(i, target * base**i + value of the first i digits)` forced at the prompt's
    last position + i for every i <= j (as `generate_steered` does); `spec_for=None` forces
    nothing. `spec_for` is asked once per (phase, label), so a random choice stays the same for
    every prefix. The last column is the probability of writing no state.
    """
    d, base = fsm.digits_per_state, fsm.base
    last = prompts.shape[1] - 1
    prompts = prompts.cpu()
    n = prompts.shape[0]
    specs: dict[tuple[int, int], SteeringSpec | None] = {}

    def spec(phase: int, label: int) -> SteeringSpec | None:
        if (phase, label) not in specs:
            specs[phase, label] = spec_for(phase, label) if spec_for is not None else None
        return specs[phase, label]

    # log P(prefix) for every digit prefix of length j, prefixes in value order: [n, base**j]
    log_prefix = torch.zeros(n, 1)
    with evaluating(model):
        for j in range(d):
            columns = []
            for value in range(base**j):
                digits = [(value // base ** (j - 1 - i)) % base for i in range(j)]
                inputs = torch.cat(
                    [prompts, torch.tensor(digits, dtype=torch.long).expand(n, j)], dim=1
                )
                with ExitStack() as stack:
                    for i in range(j + 1):
                        prefix_value = value // base ** (j - i)  # the first i digits
                        forced = spec(i, target * base**i + prefix_value)
                        if forced:
                            stack.enter_context(model.force_codes(forced, positions=[last + i]))
                    logits = checked_logits(model, inputs, fsm.vocab_size)[:, -1].cpu()
                columns.append(F.log_softmax(logits, dim=-1)[:, :base])  # digits only
            log_digit = torch.stack(columns, dim=1)  # [n, base**j, base]
            log_prefix = (log_prefix[:, :, None] + log_digit).flatten(1)
    strings = log_prefix.exp()  # [n, base**d], by value
    states = strings[:, : fsm.n_states]  # state s is written as the number s (state_to_tokens)
    no_state = (1.0 - states.sum(dim=-1, keepdim=True)).clamp(min=0.0)
    return torch.cat([states, no_state], dim=-1)


def intervention_divergence(
    model: HookedCodebookTransformer,
    fsm: FSM,
    prompts: Int[Tensor, "batch prompt_len"],
    targets: Int[Tensor, " batch"],
    spec_for: SpecFor | None,
) -> Float[Tensor, " batch"]:
    """Per prompt, JS (bits) between the steered next-state distribution and the target's true
    one (see the module docstring); prompts sharing a target are run together."""
    out = torch.empty(len(targets))
    for target in targets.unique().tolist():
        rows = targets == target
        steered = next_state_distribution(model, fsm, prompts[rows], int(target), spec_for)
        out[rows] = jensen_shannon(steered, target_distribution(fsm, targets[rows]))
    return out


__all__ = [
    "intervention_divergence",
    "jensen_shannon",
    "next_state_distribution",
    "target_distribution",
]
