"""TokFSM as a Task: labels, exclusions, data splits, the steering measure, the registry."""

import pytest
import torch

from tl_codebook.fsm import FSM, FSMConfig
from tl_codebook.fsm.task import TokFSMTask
from tl_codebook.tasks import SteeringTrials, Task, task_class, task_from_dict


def ring_task() -> TokFSMTask:
    """4 states in base 2 (2 digits each); state s goes to s+1 and s+2 (mod 4); BOS is 2."""
    fsm = FSM(
        FSMConfig(n_states=4, n_edges=2, base=2), torch.tensor([[1, 2], [2, 3], [3, 0], [0, 1]])
    )
    return TokFSMTask(fsm, seq_len=7)


def test_labels_names_and_exclusions():
    task = ring_task()
    tokens = torch.tensor([[2, 0, 1, 1, 0, 1, 1]])  # BOS, states 1, 2, 3
    assert task.concept_labels(tokens).tolist() == [[-1, -1, 1, -1, 2, -1, 3]]
    assert task.concept_names == ["state 0", "state 1", "state 2", "state 3"]
    assert task.num_concepts == 4 and task.exclude_token_ids == [2]


def test_train_and_eval_tokens_are_seeded_and_apart():
    task = ring_task()
    train, again = task.tokens(16, "train", seed=0), task.tokens(16, "train", seed=0)
    held_out = task.tokens(16, "eval", seed=0)
    assert train.shape == held_out.shape == (16, 7) and torch.equal(train, again)
    assert not torch.equal(train, held_out)
    assert (train[:, 0] == 2).all() and (task.concept_labels(train)[:, 2] >= 0).all()
    with pytest.raises(ValueError, match="split='test' is not one of train, eval"):
        task.tokens(4, "test")


def test_steering_success_is_a_successor_of_the_target():
    task = ring_task()
    trials = task.steering_trials(8, seed=0)
    assert trials.prompts.shape == (8, 1 + 3 * 2) and trials.new_tokens == 2
    assert trials.positions == (6,) and (trials.targets != trials.sources).all()
    assert torch.equal(trials.sources, task.concept_labels(trials.prompts)[:, -1])
    hand = SteeringTrials(
        prompts=torch.tensor([[2, 0, 0]] * 4),  # BOS, state 0
        sources=torch.tensor([0, 0, 0, 0]),
        targets=torch.tensor([1, 1, 3, 3]),
        new_tokens=2,
        positions=(2,),
    )
    # next states 2 (a successor of 1), 0 (not of 1), 0 (a successor of 3), then "1 2" (no state)
    generated = torch.tensor([[2, 0, 0, 1, 0], [2, 0, 0, 0, 0], [2, 0, 0, 0, 0], [2, 0, 0, 1, 2]])
    assert task.steering_success(hand, generated).tolist() == [True, False, True, False]
    # judged against the prompts' own state 0 (successors 1 and 2): only the first
    assert task.steering_success(hand.aimed_at_sources(), generated).tolist() == [
        True,
        False,
        False,
        False,
    ]


def test_the_registry_reopens_the_task_from_its_dict():
    task = ring_task()
    again = task_from_dict(task.to_dict())
    assert isinstance(again, TokFSMTask) and again.fsm == task.fsm and again.seq_len == 7
    assert task_class("tokfsm") is TokFSMTask and issubclass(TokFSMTask, Task)
    with pytest.raises(ValueError, match="task='tokfs' is not one of .*Did you mean 'tokfsm'"):
        task_class("tokfs")
    with pytest.raises(ValueError, match="must be a dict with a 'name'"):
        task_from_dict({"fsm": {}})
