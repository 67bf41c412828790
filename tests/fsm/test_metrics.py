"""TokFSM metrics on hand-made sequences, oracle models with known scores, and a real TL model."""

import math

import pytest
import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

from tl_codebook.fsm import (
    FSM,
    FSMConfig,
    first_transition_accuracy_exact,
    next_token_loss,
    sample_transition_accuracy,
    transition_accuracy,
)


def ring_fsm() -> FSM:
    """4 states in base 2 (2 digits each); state s goes to s+1 and s+2 (mod 4)."""
    transitions = torch.tensor([[1, 2], [2, 3], [3, 0], [0, 1]])
    return FSM(FSMConfig(n_states=4, n_edges=2, base=2), transitions)


class FSMOracle:
    """Causal 'model': at each position, logit 0 on digits that continue an allowed next state
    (an out-edge of `edges_of(last complete state)`, or any state at the start), -1e9 elsewhere."""

    def __init__(self, fsm: FSM, edges_of=None):
        self.fsm = fsm
        self.edges_of = edges_of or (lambda s: fsm.transitions[s].tolist())
        self.digits = [fsm.state_to_tokens(s) for s in range(fsm.n_states)]
        self.state_of = {tuple(digits): s for s, digits in enumerate(self.digits)}

    def _next_token_logits(self, prefix: list[int]) -> torch.Tensor:
        fsm, d = self.fsm, self.fsm.digits_per_state
        digits = prefix[1:]
        n_complete, partial = divmod(len(digits), d)
        if n_complete == 0:
            allowed_states = range(fsm.n_states)
        else:
            last = self.state_of.get(tuple(digits[(n_complete - 1) * d : n_complete * d]))
            allowed_states = [] if last is None else self.edges_of(last)
        started = digits[n_complete * d :]
        allowed_digits = {
            self.digits[t][partial] for t in allowed_states if self.digits[t][:partial] == started
        }
        logits = torch.full((fsm.vocab_size,), -1e9)
        logits[sorted(allowed_digits) or list(range(fsm.base))] = 0.0
        return logits

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        rows = tokens.tolist()
        return torch.stack(
            [
                torch.stack([self._next_token_logits(row[: p + 1]) for p in range(len(row))])
                for row in rows
            ]
        )


def sequences(fsm: FSM, walks: list[list[int]]) -> torch.Tensor:
    return fsm.trajectory_to_tokens(torch.tensor(walks))


def test_all_valid_walks_score_one():
    fsm = ring_fsm()
    result = transition_accuracy(fsm, sequences(fsm, [[0, 1, 2, 3, 0], [3, 1, 3, 0, 2]]))
    assert result.accuracy == 1.0 and result.first_transition_accuracy == 1.0
    assert result.n_transitions == 8 and result.n_first_transitions == 2


def test_planted_invalid_steps_give_the_exact_fraction():
    fsm = ring_fsm()
    # second walk: 0->0 invalid, 0->1 valid, 1->3 valid, 3->3 invalid
    tokens = sequences(fsm, [[0, 1, 2, 3, 0], [0, 0, 1, 3, 3]])
    result = transition_accuracy(fsm, tokens)
    assert result.accuracy == 6 / 8
    assert result.first_transition_accuracy == 1 / 2
    # two prompt states (5 tokens): only transitions into states 2, 3, 4 are generated
    result = transition_accuracy(fsm, tokens, prompt_len=5)
    assert (result.accuracy, result.n_transitions) == (5 / 6, 6)
    assert result.first_transition_accuracy == 1.0  # 1->2 and 0->1
    # a prompt ending inside state 1: the step into state 1 is generated
    assert transition_accuracy(fsm, tokens, prompt_len=4).n_transitions == 8
    # a trailing partial state changes nothing
    with_partial = torch.cat([tokens, torch.zeros(2, 1, dtype=torch.long)], dim=1)
    assert transition_accuracy(fsm, with_partial).accuracy == 6 / 8


def test_non_states_make_both_adjacent_transitions_invalid():
    fsm = ring_fsm()
    bos = fsm.bos_token
    # states 0, 1, <BOS BOS>, 2, 3
    tokens = torch.tensor([[bos, 0, 0, 0, 1, bos, bos, 1, 0, 1, 1]])
    result = transition_accuracy(fsm, tokens)
    assert (result.accuracy, result.n_transitions) == (2 / 4, 4)


def test_sequences_without_generated_transitions_raise():
    fsm = ring_fsm()
    with pytest.raises(ValueError, match="no transition ends after the prompt"):
        transition_accuracy(fsm, sequences(fsm, [[0, 1]]), prompt_len=5)
    with pytest.raises(ValueError, match="prompt_len must be an integer >= 1"):
        transition_accuracy(fsm, sequences(fsm, [[0, 1]]), prompt_len=0)


def test_oracle_samples_only_valid_transitions():
    fsm = FSM.generate(FSMConfig(n_states=100, n_edges=10, base=10, seed=0))
    result = sample_transition_accuracy(FSMOracle(fsm), fsm, n_samples=6, seq_len=15, seed=1)
    assert result.accuracy == 1.0 and result.first_transition_accuracy == 1.0
    # prompt BOS + 1 state (3 tokens); 6 more complete states -> 6 transitions each
    assert result.n_transitions == 36
    bos_only = sample_transition_accuracy(
        FSMOracle(fsm), fsm, n_samples=4, prompt_states=0, seq_len=7, temperature=0.0
    )
    assert (bos_only.accuracy, bos_only.n_transitions) == (1.0, 8)


def test_a_model_stuck_on_one_state_scores_zero_after_the_first_step():
    fsm = ring_fsm()  # no self-loops: 1 -> 1 is invalid
    stuck = FSMOracle(fsm, edges_of=lambda s: [1])
    result = sample_transition_accuracy(stuck, fsm, n_samples=8, prompt_states=2, seq_len=15)
    # transitions: last prompt state -> 1, then 1 -> 1 four times
    assert result.n_transitions == 8 * 5
    assert result.accuracy == pytest.approx(result.first_transition_accuracy / 5)


@pytest.mark.parametrize(("n_states", "n_edges", "base"), [(100, 10, 10), (30, 5, 4), (6, 2, 10)])
def test_exact_first_transition_accuracy_of_oracles(n_states, n_edges, base):
    fsm = FSM.generate(FSMConfig(n_states=n_states, n_edges=n_edges, base=base, seed=1))
    assert first_transition_accuracy_exact(FSMOracle(fsm), fsm) == 1.0
    # an oracle that answers with the out-edges of the next state
    shifted = FSMOracle(fsm, edges_of=lambda s: fsm.transitions[(s + 1) % n_states].tolist())
    matrix = fsm.transition_matrix
    expected = (matrix & matrix.roll(-1, dims=0)).sum(dim=1).float().mean() / n_edges
    assert first_transition_accuracy_exact(shifted, fsm, batch_size=7) == pytest.approx(
        expected.item()
    )


@pytest.fixture(scope="module")
def tiny_model() -> HookedTransformer:
    torch.manual_seed(0)
    cfg = HookedTransformerConfig(
        n_layers=1, d_model=32, n_ctx=12, d_head=8, n_heads=2, d_mlp=64, d_vocab=5, act_fn="relu"
    )
    return HookedTransformer(cfg)


def test_exact_first_transition_accuracy_matches_brute_force(tiny_model):
    fsm = FSM.generate(FSMConfig(n_states=12, n_edges=3, base=4, seed=0))
    d = fsm.digits_per_state
    states = torch.arange(fsm.n_states)
    # every (s, t): BOS + s + all of t but its last digit; sum t's digit log-probs
    prompts = fsm.trajectory_to_tokens(states[:, None]).repeat_interleave(fsm.n_states, 0)
    continuations = fsm.trajectory_to_tokens(states[:, None], add_bos=False).repeat(fsm.n_states, 1)
    with torch.no_grad():
        inputs = torch.cat([prompts, continuations[:, :-1]], dim=1)
        log_probs = tiny_model(inputs).log_softmax(-1)[:, d:]
    scores = log_probs.gather(2, continuations[:, :, None]).sum(dim=(1, 2))
    top = scores.reshape(fsm.n_states, fsm.n_states).topk(fsm.n_edges).indices
    expected = fsm.transition_matrix.gather(1, top).float().mean().item()
    tiny_model.train()
    assert first_transition_accuracy_exact(tiny_model, fsm) == pytest.approx(expected)
    assert tiny_model.training  # the training flag is restored


def test_sampling_from_a_hooked_transformer(tiny_model):
    fsm = FSM.generate(FSMConfig(n_states=12, n_edges=3, base=4, seed=0))
    first = sample_transition_accuracy(tiny_model, fsm, n_samples=5, seed=3)
    assert first == sample_transition_accuracy(tiny_model, fsm, n_samples=5, seed=3)
    # n_ctx 12 = BOS + 5 states of 2 digits + 1 digit: 4 generated transitions per sample
    assert first.n_transitions == 20 and 0.0 <= first.accuracy <= 1.0


def test_next_token_loss_known_answers():
    def uniform(tokens):
        return torch.zeros(*tokens.shape, 11)

    tokens = torch.tensor([[10, 0, 1], [10, 1, 1]])
    assert next_token_loss(uniform, tokens) == pytest.approx(math.log(11))

    fixed = torch.tensor([math.log(0.75), math.log(0.25)])

    def two_tokens(tokens):
        return fixed.expand(*tokens.shape, 2)

    # targets 0, 1, 1, 1; the last position is not scored
    expected = -(math.log(0.75) + 3 * math.log(0.25)) / 4
    assert next_token_loss(two_tokens, tokens) == pytest.approx(expected)
    assert next_token_loss(two_tokens, tokens, batch_size=1) == pytest.approx(expected)
