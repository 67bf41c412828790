"""The induction task: shipped models induct, the truth is stable and behaviourally checked."""

from __future__ import annotations

import pytest
import torch

from tl_codebook.circuit_tasks.induction import (
    BOS,
    FIRST_CONTENT_TOKEN,
    HALF_LENGTH,
    MARKER,
    induction_metric,
    induction_prompts,
    induction_task,
    load_induction_model,
    repeat_loss,
    shipped_seeds,
    train_induction_model,
)
from tl_codebook.comparisons.circuits.task import model_edges, model_heads

SEEDS = (0, 1, 2)


def _task(seed: int):
    if seed not in shipped_seeds():
        pytest.fail(f"no shipped weights for induction seed {seed}; shipped: {shipped_seeds()}")
    return induction_task(seed, n_prompts=30)


class _Tasks(dict):
    def __missing__(self, seed: int):
        self[seed] = _task(seed)
        return self[seed]


@pytest.fixture(scope="module")
def tasks():
    return _Tasks()


@pytest.mark.parametrize("seed", SEEDS)
def test_shipped_model_inducts(tasks, seed):
    task = tasks[seed]
    first, rep = repeat_loss(task.model, task.clean)
    assert first > 3.5  # about log(62): the first half is unpredictable
    assert rep < 0.5 * first


@pytest.mark.parametrize("seed", SEEDS)
def test_truth_structure(tasks, seed):
    """>= 1 previous-token head in layer 0, >= 1 induction head in layer 1, >= 1 head outside
    the truth, and no disagreement between the attention criteria."""
    task = tasks[seed]
    notes = task.notes
    assert any(h.startswith("L0") for h in notes["prev_token_heads"])
    assert any(h.startswith("L1") for h in notes["induction_heads"])
    assert len(notes["outside_circuit"]) >= 1
    assert task.true_nodes == set(notes["prev_token_heads"]) | set(notes["induction_heads"])
    assert set(task.true_edges) <= set(model_edges(task.model))
    for i in notes["induction_heads"]:
        assert f"{i}->logits" in task.true_edges and f"input->{i}" in task.true_edges
    assert not [d for d in notes["truth_disagreements"] if "without" in d or "no induction" in d]


@pytest.mark.parametrize("seed", SEEDS)
def test_truth_behavioural_check(tasks, seed):
    check = tasks[seed].notes["ablation_check"]
    assert check["holds"], check
    assert check["gap_closed_ablate_induction"] >= 0.5
    assert check["gap_closed_ablate_outside"] < 0.2


@pytest.mark.parametrize("seed", SEEDS)
def test_metric_clean_above_corrupted(tasks, seed):
    task = tasks[seed]
    with torch.no_grad():
        clean = task.metric(task.model(task.clean), task.clean)
        corrupted = task.metric(task.model(task.corrupted), task.clean)
    assert clean.shape == (task.n,)
    assert clean.mean() > corrupted.mean() + 2.0


def test_shapes_positions_and_tokens(tasks):
    task = tasks[0]
    n, pos = task.clean.shape
    assert (n, pos) == (30, 2 * HALF_LENGTH + 1)
    assert task.positions is not None and task.positions.shape == (n, pos)
    assert task.positions.dtype == torch.bool
    assert task.positions[:, HALF_LENGTH + 1 : 2 * HALF_LENGTH].all()
    assert task.positions.sum() == n * (HALF_LENGTH - 1)
    assert (task.clean[:, 0] == BOS).all()
    assert (task.clean[:, 1:] >= FIRST_CONTENT_TOKEN).all()
    assert not (task.clean == MARKER).any()
    half = HALF_LENGTH
    assert torch.equal(task.clean[:, 1 : half + 1], task.clean[:, half + 1 :])
    assert torch.equal(task.corrupted[:, : half + 1], task.clean[:, : half + 1])
    for row in task.corrupted:
        assert not set(row[1 : half + 1].tolist()) & set(row[half + 1 :].tolist())
    assert torch.equal(task.negative_prompts, task.corrupted)
    assert "induction" in task.name
    assert set(task.notes["head_scores"]) == set(model_heads(task.model))


def test_same_seed_same_prompts():
    a = induction_prompts(5, seed=7)
    b = induction_prompts(5, seed=7)
    c = induction_prompts(5, seed=8)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_metric_is_differentiable():
    clean, _ = induction_prompts(3, half=5)
    logits = torch.randn(3, clean.shape[1], 64, requires_grad=True)
    induction_metric(logits, clean).sum().backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_tiny_training_is_deterministic():
    a = train_induction_model(3, steps=3, batch_size=8)
    b = train_induction_model(3, steps=3, batch_size=8)
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key


def test_unknown_seed_lists_shipped_seeds():
    with pytest.raises(ValueError, match="shipped seeds"):
        load_induction_model(987)
    with pytest.raises(ValueError, match="half"):
        induction_prompts(2, half=40)
