"""FSM generation, token format, persistence and input validation."""

import json

import pytest
import torch

from tl_codebook.fsm import FSM, FSMConfig


def ring_fsm() -> FSM:
    """4 states in base 2 (2 digits each); state s goes to s+1 and s+2 (mod 4)."""
    transitions = torch.tensor([[1, 2], [2, 3], [3, 0], [0, 1]])
    return FSM(FSMConfig(n_states=4, n_edges=2, base=2), transitions)


def test_generated_fsm_has_distinct_out_edges():
    fsm = FSM.generate(FSMConfig(n_states=100, n_edges=10, base=10, seed=3))
    assert fsm.transitions.shape == (100, 10)
    for row in fsm.transitions.tolist():
        assert len(set(row)) == 10
        assert all(0 <= target < 100 for target in row)
    matrix = fsm.transition_matrix
    assert matrix.shape == (100, 100)
    assert matrix.sum(dim=1).tolist() == [10] * 100
    for state, row in enumerate(fsm.transitions.tolist()):
        assert matrix[state].nonzero().flatten().tolist() == sorted(row)


def test_generation_is_seeded():
    cfg = FSMConfig(n_states=50, n_edges=5, base=10, seed=7)
    assert FSM.generate(cfg) == FSM.generate(cfg)
    other = FSM.generate(FSMConfig(n_states=50, n_edges=5, base=10, seed=8))
    assert not torch.equal(FSM.generate(cfg).transitions, other.transitions)


def test_full_out_degree_is_every_state():
    fsm = FSM.generate(FSMConfig(n_states=5, n_edges=5, base=10, seed=0))
    assert fsm.transition_matrix.all()


@pytest.mark.parametrize(
    ("n_states", "base", "digits"),
    [(100, 10, 2), (101, 10, 3), (10, 10, 1), (11, 10, 2), (1, 10, 1), (4, 2, 2), (5, 2, 3)],
)
def test_digits_per_state(n_states, base, digits):
    fsm = FSM.generate(FSMConfig(n_states=n_states, n_edges=1, base=base))
    assert fsm.digits_per_state == digits
    assert fsm.bos_token == base
    assert fsm.vocab_size == base + 1


def test_state_to_tokens_most_significant_digit_first():
    fsm = FSM.generate(FSMConfig())
    assert fsm.state_to_tokens(7) == [0, 7]
    assert fsm.state_to_tokens(42) == [4, 2]
    assert ring_fsm().state_to_tokens(2) == [1, 0]
    with pytest.raises(ValueError, match=r"\[0, 99\], got 100"):
        fsm.state_to_tokens(100)


def test_states_round_trip_through_tokens():
    fsm = FSM.generate(FSMConfig(n_states=30, n_edges=4, base=4, seed=1))
    walk = fsm.sample_trajectory(20, torch.Generator().manual_seed(0))
    tokens = fsm.trajectory_to_tokens(walk)
    assert tokens[0] == fsm.bos_token
    assert tokens[1:].tolist() == sum((fsm.state_to_tokens(s) for s in walk.tolist()), [])
    assert torch.equal(fsm.tokens_to_states(tokens), walk)
    batch = fsm.sample_trajectories(3, 5, torch.Generator().manual_seed(1))
    assert torch.equal(fsm.tokens_to_states(fsm.trajectory_to_tokens(batch)), batch)


def test_tokens_to_states_drops_partial_state_and_marks_non_states():
    fsm = FSM.generate(FSMConfig(n_states=50, n_edges=3, base=10))
    bos = fsm.bos_token
    # after BOS: 42 | 99 (>= 50, not a state) | 1 BOS (not digits) | 0 (partial, dropped)
    tokens = [bos, 4, 2, 9, 9, 1, bos, 0]
    assert fsm.tokens_to_states(tokens).tolist() == [42, -1, -1]
    assert fsm.tokens_to_states([4, 2, 0], starts_with_bos=False).tolist() == [42]
    assert fsm.tokens_to_states([bos, 3]).tolist() == []
    with pytest.raises(ValueError, match="start with BOS"):
        fsm.tokens_to_states([4, 2])


def test_is_valid_transition():
    fsm = ring_fsm()
    assert fsm.is_valid_transition(0, 1) and fsm.is_valid_transition(0, 2)
    assert not fsm.is_valid_transition(0, 0) and not fsm.is_valid_transition(0, 3)
    assert fsm.is_valid_transition(3, 0)
    with pytest.raises(ValueError, match=r"\[0, 3\]"):
        fsm.is_valid_transition(0, 4)


def test_sampled_trajectories_follow_edges_and_are_seeded():
    fsm = FSM.generate(FSMConfig(n_states=20, n_edges=3, base=10, seed=2))
    walks = fsm.sample_trajectories(50, 30, torch.Generator().manual_seed(5))
    assert walks.shape == (50, 30)
    assert fsm.transition_matrix[walks[:, :-1], walks[:, 1:]].all()
    again = fsm.sample_trajectories(50, 30, torch.Generator().manual_seed(5))
    assert torch.equal(walks, again)
    assert len(set(walks[:, 0].tolist())) > 10  # start states are spread over the states


def test_save_load_round_trip(tmp_path):
    fsm = FSM.generate(FSMConfig(n_states=12, n_edges=4, base=3, seed=9))
    path = tmp_path / "fsm.json"
    fsm.save(path)
    saved = json.loads(path.read_text())
    assert saved["config"] == {"n_states": 12, "n_edges": 4, "base": 3, "seed": 9}
    assert FSM.load(path) == fsm
    path.write_text(json.dumps({"format": "something else", "version": 1}))
    with pytest.raises(ValueError, match="not a saved FSM"):
        FSM.load(path)


def test_config_dict_round_trip_and_key_errors():
    cfg = FSMConfig(n_states=10, n_edges=2, base=3, seed=4)
    assert FSMConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="missing required key.*seed"):
        FSMConfig.from_dict({"n_states": 10, "n_edges": 2, "base": 3})
    with pytest.raises(ValueError, match="'n_state' \\(did you mean 'n_states'\\?\\)"):
        FSMConfig.from_dict({**cfg.to_dict(), "n_state": 3})


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n_states": 10, "n_edges": 11}, r"n_edges=11 must be between 1 and n_states=10"),
        ({"n_edges": 0}, r"n_edges must be an integer >= 1, got 0"),
        ({"n_states": 0}, r"n_states must be an integer >= 1, got 0"),
        ({"base": 1}, r"base must be an integer >= 2, got 1"),
    ],
)
def test_bad_config_raises(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FSMConfig(**kwargs)


def test_bad_transitions_raise():
    cfg = FSMConfig(n_states=3, n_edges=2, base=10)
    with pytest.raises(ValueError, match=r"shape \(n_states, n_edges\)=\(3, 2\)"):
        FSM(cfg, torch.zeros(3, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[0, 2\], got 3"):
        FSM(cfg, torch.tensor([[0, 1], [1, 3], [0, 2]]))
    with pytest.raises(ValueError, match=r"state 1 has repeated out-edges \[2, 2\]"):
        FSM(cfg, torch.tensor([[0, 1], [2, 2], [0, 2]]))
