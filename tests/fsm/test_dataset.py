"""TokFSM token streams: format, reproducibility, worker seeds, held-out set, state labels."""

import itertools

import pytest
import torch
from torch.utils.data import DataLoader

from tl_codebook.fsm import FSM, FSMConfig, TokFSMDataset, determined_states, transition_accuracy


@pytest.fixture(scope="module")
def fsm() -> FSM:
    return FSM.generate(FSMConfig(n_states=100, n_edges=10, base=10, seed=0))


def test_sequences_are_bos_then_valid_walks_cut_at_seq_len(fsm):
    dataset = TokFSMDataset(fsm, seq_len=8, seed=0)
    batch = next(dataset.batches(16))
    assert batch.shape == (16, 8) and batch.dtype == torch.long
    assert (batch[:, 0] == fsm.bos_token).all()
    assert ((batch[:, 1:] >= 0) & (batch[:, 1:] < 10)).all()
    # BOS + 3 states + the first digit of a 4th
    assert fsm.tokens_to_states(batch).shape == (16, 3)
    assert transition_accuracy(fsm, batch).accuracy == 1.0
    assert len(set(batch[:, 1].tolist())) > 1


def test_seeded_stream_is_reproducible(fsm):
    first = list(itertools.islice(TokFSMDataset(fsm, seq_len=12, seed=4), 10))
    again = list(itertools.islice(TokFSMDataset(fsm, seq_len=12, seed=4), 10))
    other = list(itertools.islice(TokFSMDataset(fsm, seq_len=12, seed=5), 10))
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(torch.stack(first), torch.stack(other))


def test_batches_group_the_stream(fsm):
    dataset = TokFSMDataset(fsm, seq_len=6, seed=1, chunk_size=5)
    rows = torch.stack(list(itertools.islice(dataset, 12)))
    batches = list(itertools.islice(dataset.batches(3), 4))
    assert all(b.shape == (3, 6) for b in batches)
    assert torch.equal(torch.cat(batches), rows)


def test_dataloader_workers_read_distinct_streams(fsm):
    dataset = TokFSMDataset(fsm, seq_len=10, seed=2, chunk_size=8)
    loader = DataLoader(dataset, batch_size=4, num_workers=2)
    worker0, worker1 = itertools.islice(loader, 2)  # batches alternate between workers
    assert not torch.equal(worker0, worker1)
    main_process = torch.stack(list(itertools.islice(dataset, 4)))
    assert torch.equal(worker0, main_process)


def test_held_out_is_fixed_and_not_the_training_stream(fsm):
    dataset = TokFSMDataset(fsm, seq_len=16, seed=0)
    held_out = dataset.held_out(32, seed=0)
    assert held_out.shape == (32, 16)
    assert torch.equal(held_out, TokFSMDataset(fsm, seq_len=16, seed=0).held_out(32, seed=0))
    assert not torch.equal(held_out, dataset.held_out(32, seed=1))
    assert not torch.equal(held_out, next(dataset.batches(32)))
    assert transition_accuracy(fsm, held_out).accuracy == 1.0


def test_bad_arguments_raise(fsm):
    with pytest.raises(ValueError, match="seq_len must be an integer >= 2"):
        TokFSMDataset(fsm, seq_len=1)
    with pytest.raises(ValueError, match="seed must be an integer >= 0"):
        TokFSMDataset(fsm, seed=-1)
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1, got 0"):
        next(TokFSMDataset(fsm).batches(0))


def test_determined_states_on_a_hand_made_sequence(fsm):
    bos = fsm.bos_token
    tokens = torch.tensor([bos, 0, 5, 6, 3, 7])  # states 5, 63, then a partial state
    assert determined_states(fsm, tokens).tolist() == [-1, -1, 5, -1, 63, -1]
    assert determined_states(fsm, tokens, hold=True).tolist() == [-1, -1, 5, 5, 63, 63]
    batch = torch.stack([tokens, torch.tensor([bos, 9, 9, 1, 2, 0])])
    assert determined_states(fsm, batch).tolist() == [
        [-1, -1, 5, -1, 63, -1],
        [-1, -1, 99, -1, 12, -1],
    ]


def test_determined_states_marks_non_states():
    fsm = FSM.generate(FSMConfig(n_states=50, n_edges=3, base=10))
    tokens = torch.tensor([fsm.bos_token, 4, 2, 9, 9, 1, 2])  # 42, 99 (not a state), 12
    assert determined_states(fsm, tokens).tolist() == [-1, -1, 42, -1, -1, -1, 12]
    assert determined_states(fsm, tokens, hold=True).tolist() == [-1, -1, 42, 42, -1, -1, 12]
