"""The one-head fixture: one head carries the metric, three active distractors carry nothing."""

from __future__ import annotations

import pytest
import torch

from tl_codebook.circuit_tasks.one_head import CARRIER, one_head_task
from tl_codebook.comparisons.circuits.task import model_edges, model_heads, parse_head


@pytest.fixture(scope="module")
def task():
    return one_head_task()


def _ablated_metric(task, head: str) -> torch.Tensor:
    layer, index = parse_head(head)

    def zero(z, hook):
        z[:, :, index] = 0.0
        return z

    with torch.no_grad():
        logits = task.model.run_with_hooks(
            task.clean, fwd_hooks=[(f"blocks.{layer}.attn.hook_z", zero)]
        )
    return task.metric(logits, task.clean)


def _metric(task, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return task.metric(task.model(tokens), task.clean)


def test_fields_and_shapes(task):
    assert task.name == "one_head"
    assert task.model.cfg.attn_only
    assert task.clean.shape == task.corrupted.shape == (20, 10)
    assert task.negative_prompts is task.corrupted
    assert task.positions is not None and task.positions.dtype == torch.bool
    assert not task.positions[:, 0].any() and task.positions[:, 1:].all()
    assert task.true_nodes == {CARRIER} and CARRIER in model_heads(task.model)
    assert task.true_edges == {f"input->{CARRIER}", f"{CARRIER}->logits"}
    assert task.true_edges <= set(model_edges(task.model))
    assert (task.clean < 8).all() and (task.corrupted == task.clean + 8).all()
    assert _metric(task, task.clean).shape == (20,)


def test_same_seed_same_prompts():
    a, b, c = one_head_task(seed=3), one_head_task(seed=3), one_head_task(seed=4)
    assert torch.equal(a.clean, b.clean) and torch.equal(a.corrupted, b.corrupted)
    assert not torch.equal(a.clean, c.clean)
    assert one_head_task(n_prompts=5).clean.shape == (5, 10)


def test_bad_n_prompts():
    with pytest.raises(ValueError, match="n_prompts"):
        one_head_task(n_prompts=0)


def test_carrier_carries_the_metric(task):
    clean = _metric(task, task.clean)
    assert (clean > 3.5).all()
    assert torch.allclose(_metric(task, task.corrupted), torch.full((20,), -5 / 16))
    assert _ablated_metric(task, CARRIER).abs().max() < 1e-6


def test_distractors_do_not_matter_but_are_active(task):
    clean = _metric(task, task.clean)
    with torch.no_grad():
        _, cache = task.model.run_with_cache(task.clean)
        _, cache_neg = task.model.run_with_cache(task.negative_prompts)
    for head in model_heads(task.model):
        layer, index = parse_head(head)
        z = cache["z", layer][:, :, index]
        z_neg = cache_neg["z", layer][:, :, index]
        assert z.abs().max() > 0.1, head  # active
        assert z[:, 1:].std(dim=0).max() > 0.05, head  # input-dependent
        if head == CARRIER:
            assert (z - z_neg).abs().max() > 0.5  # moves on the negatives
            continue
        assert (_ablated_metric(task, head) - clean).abs().max() < 1e-5, head
        assert (z - z_neg).abs().max() < 1e-6, head  # same on the negatives


def test_attention_not_saturated(task):
    """Attribution methods need nonzero gradients through the carrier's attention."""
    layer, index = parse_head(CARRIER)
    store = {}

    def keep(pattern, hook):
        pattern.retain_grad()
        store["pattern"] = pattern
        return pattern

    logits = task.model.run_with_hooks(
        task.clean, fwd_hooks=[(f"blocks.{layer}.attn.hook_pattern", keep)]
    )
    task.metric(logits, task.clean).sum().backward()
    grad = store["pattern"].grad[:, index]
    assert grad.abs().max() > 0.01
    prev = store["pattern"][:, index].diagonal(offset=-1, dim1=-2, dim2=-1)
    assert 0.8 < prev.min() and prev.max() < 0.99
