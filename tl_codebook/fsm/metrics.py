"""How well a model has learned a TokFSM: transition accuracy of samples, exact first-transition
accuracy, and held-out next-token loss.

`model` is anything mapping `Int[Tensor, "batch pos"]` tokens to `Float[Tensor, "batch pos vocab"]`
logits with causal attention: a `HookedTransformer` (with or without codebooks) or a plain callable.
Generation is the one `tl_codebook.tasks.sample_sequences` (re-exported here).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from jaxtyping import Int
from torch import Tensor

from tl_codebook.fsm.machine import FSM
from tl_codebook.tasks import TokensToLogits, sample_sequences
from tl_codebook.tasks import checked_logits as _logits
from tl_codebook.tasks import evaluating as _evaluating


@dataclass(frozen=True)
class TransitionAccuracy:
    """Fractions of generated state transitions that are edges of the FSM."""

    accuracy: float
    """Over every counted transition."""
    first_transition_accuracy: float
    """Over the first counted transition of each sequence."""
    n_transitions: int
    """Transitions counted for `accuracy` (over all sequences)."""
    n_first_transitions: int
    """Transitions counted for `first_transition_accuracy`: one per sequence."""


def transition_accuracy(
    fsm: FSM, token_sequences: Int[Tensor, "batch pos"], prompt_len: int = 1
) -> TransitionAccuracy:
    """Score the transitions between consecutive complete states of BOS-led token sequences.

    The first `prompt_len` tokens (BOS included) are the prompt. A transition `a -> b` counts
    when `b` ends after the prompt, so the step from the last prompt state to the first generated
    state is the first transition (with a BOS-only prompt it is the step between the first two
    generated states). A trailing partial state is ignored; a digit group that is not a state
    (see `FSM.tokens_to_states`) makes the transitions into and out of it invalid.

    Args:
        fsm: the machine whose edges are the valid transitions.
        token_sequences: token ids `[batch, pos]`, each starting with BOS.
        prompt_len: tokens of the prompt, BOS included.

    Raises:
        ValueError: for `prompt_len < 1`, sequences that do not start with BOS, or sequences
            too short for any transition to end after the prompt.
    """
    if isinstance(prompt_len, bool) or not isinstance(prompt_len, int) or prompt_len < 1:
        raise ValueError(f"prompt_len must be an integer >= 1 (BOS), got {prompt_len!r}.")
    states = fsm.tokens_to_states(token_sequences.cpu())
    d = fsm.digits_per_state
    source, target = states[:, :-1], states[:, 1:]
    valid = (source >= 0) & (target >= 0)
    valid &= fsm.transition_matrix[source.clamp(min=0), target.clamp(min=0)]
    # transition j goes into state j + 1, whose last digit is at position (j + 2) * d
    target_end = (torch.arange(target.shape[1]) + 2) * d
    counted = target_end >= prompt_len
    n_counted = int(counted.sum())
    if n_counted == 0:
        raise ValueError(
            f"no transition ends after the prompt: sequences of {token_sequences.shape[1]} tokens "
            f"with prompt_len={prompt_len} and {d} digits per state; generate longer sequences."
        )
    first = int(counted.nonzero()[0].item())
    n_sequences = token_sequences.shape[0]
    return TransitionAccuracy(
        accuracy=int(valid[:, counted].sum()) / (n_counted * n_sequences),
        first_transition_accuracy=int(valid[:, first].sum()) / n_sequences,
        n_transitions=n_counted * n_sequences,
        n_first_transitions=n_sequences,
    )


def sample_transition_accuracy(
    model: TokensToLogits,
    fsm: FSM,
    n_samples: int = 100,
    prompt_states: int = 1,
    seq_len: int | None = None,
    temperature: float = 1.0,
    seed: int = 0,
) -> TransitionAccuracy:
    """The paper's transition accuracy: sample `n_samples` continuations and score their steps.

    Each prompt is BOS + the digits of a random walk of `prompt_states` states (0: BOS only);
    generations run to `seq_len` tokens (default: `model.cfg.n_ctx`). `seed` fixes prompts and
    samples.

    Raises:
        ValueError: for no `seq_len` and a model without `cfg.n_ctx`, `n_samples < 1`,
            `prompt_states < 0`, a negative temperature, `seq_len` not above the prompt, logits
            of the wrong shape, or sequences too short for a transition after the prompt.
    """
    if seq_len is None:
        n_ctx = getattr(getattr(model, "cfg", None), "n_ctx", None)
        if n_ctx is None:
            raise ValueError("seq_len is required for a model without cfg.n_ctx.")
        seq_len = int(n_ctx)
    if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 1:
        raise ValueError(f"n_samples must be an integer >= 1, got {n_samples!r}.")
    if isinstance(prompt_states, bool) or not isinstance(prompt_states, int) or prompt_states < 0:
        raise ValueError(f"prompt_states must be an integer >= 0, got {prompt_states!r}.")
    generator = torch.Generator().manual_seed(seed)
    if prompt_states > 0:
        walks = fsm.sample_trajectories(n_samples, prompt_states, generator)
        prompts = fsm.trajectory_to_tokens(walks)
    else:
        prompts = torch.full((n_samples, 1), fsm.bos_token, dtype=torch.long)
    samples = sample_sequences(model, prompts, seq_len, temperature, generator)
    return transition_accuracy(fsm, samples, prompt_len=prompts.shape[1])


def first_transition_accuracy_exact(
    model: TokensToLogits, fsm: FSM, batch_size: int = 1024
) -> float:
    """The reference tutorial's metric: overlap of the model's top-E next states with the true ones.

    For each state `s`, prompt BOS + digits(s); the probability of next state `t` is the product
    of its digits' conditional probabilities (exact, from forward passes over every digit prefix
    a state can have). The top `n_edges` states are compared with `s`'s out-edges; the score is
    the mean over states of |top-E ∩ out-edges| / E.

    Needs no sampling (deterministic), and `n_states * prefixes` forward passes of length
    `1 + 2 * digits_per_state - 1`, `batch_size` at a time.

    Returns:
        The score in [0, 1].

    Raises:
        ValueError: if the model's logits are not `[batch, pos, vocab]` or its vocabulary is
            smaller than the FSM's.
    """
    n, d = fsm.n_states, fsm.digits_per_state
    all_states = torch.arange(n)
    state_digits = fsm.trajectory_to_tokens(all_states[:, None], add_bos=False)  # [n, d]
    # Each next state t is read after its first d-1 digits; only distinct such prefixes are run.
    if d == 1:
        prefixes, prefix_of_state = state_digits[:1, :0], torch.zeros(n, dtype=torch.long)
    else:
        prefixes, prefix_of_state = torch.unique(state_digits[:, :-1], dim=0, return_inverse=True)
    n_prefixes = prefixes.shape[0]
    prompts = fsm.trajectory_to_tokens(all_states[:, None])  # [n, 1 + d]
    inputs = torch.cat(
        [
            prompts[:, None, :].expand(n, n_prefixes, 1 + d),
            prefixes[None, :, :].expand(n, n_prefixes, d - 1),
        ],
        dim=-1,
    ).flatten(0, 1)
    chunks = []
    with _evaluating(model):
        for batch in inputs.split(batch_size):
            # position d predicts t's first digit; position d + i its digit i
            logits = _logits(model, batch, fsm.vocab_size)[:, d:]
            chunks.append(F.log_softmax(logits, dim=-1).cpu())
    log_probs = torch.cat(chunks).unflatten(0, (n, n_prefixes))  # [s, prefix, digit i, token]
    digit_index = torch.arange(d)
    # log P(t | s) = sum_i log_probs[s, prefix(t), i, digit_i(t)]  -> [s, t]
    next_state_log_probs = log_probs[
        :, prefix_of_state[:, None], digit_index[None, :], state_digits
    ].sum(dim=-1)
    top = next_state_log_probs.topk(fsm.n_edges, dim=-1).indices
    hits = fsm.transition_matrix.gather(1, top).float().sum(dim=-1)
    return (hits / fsm.n_edges).mean().item()


def next_token_loss(
    model: TokensToLogits, tokens: Int[Tensor, "batch pos"], batch_size: int = 64
) -> float:
    """Mean next-token cross-entropy over every position but the last (nothing else masked).

    Args:
        model: maps tokens to logits (run in eval mode, without gradients).
        tokens: token ids `[batch, pos]`, `pos >= 2`.
        batch_size: sequences per forward pass.

    Returns:
        The mean loss in nats per predicted token.

    Raises:
        ValueError: for fewer than 2 tokens per sequence, or logits of the wrong shape.
    """
    if tokens.shape[1] < 2:
        raise ValueError(f"need at least 2 tokens per sequence, got {tokens.shape[1]}.")
    total, count = 0.0, 0
    with _evaluating(model):
        for batch in tokens.split(batch_size):
            logits = _logits(model, batch, 1)[:, :-1]
            targets = batch[:, 1:].to(logits.device)
            loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum")
            total += loss.item()
            count += targets.numel()
    return total / count


__all__ = [
    "TokensToLogits",
    "TransitionAccuracy",
    "first_transition_accuracy_exact",
    "next_token_loss",
    "sample_sequences",
    "sample_transition_accuracy",
    "transition_accuracy",
]
