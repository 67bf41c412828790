"""The tracr-compiled two_back task: the model is the program, the circuit is the designed one."""

from __future__ import annotations

import pytest
import torch

from tl_codebook.circuit_tasks.compiled import (
    BOS,
    SEQ_LEN,
    compiled_task,
    load_compiled_model,
    reference_distractors,
    reference_two_back,
)
from tl_codebook.comparisons.circuits.task import model_edges, model_heads, parse_head

CIRCUIT = {"L0H0", "L1H1"}
DISTRACTORS = {"L0H1", "L1H0"}


@pytest.fixture(scope="module")
def task():
    return compiled_task()


@pytest.fixture(scope="module")
def meta():
    return load_compiled_model("two_back")[1]


def _random_sequences(meta, n: int, seed: int) -> torch.Tensor:
    """Random sequences over every program token (not only the prompt distribution)."""
    names = meta["tokens"]
    plain = torch.tensor([i for i, t in enumerate(names) if t not in (BOS, "compiler_pad")])
    gen = torch.Generator().manual_seed(seed)
    body = plain[torch.randint(0, len(plain), (n, SEQ_LEN - 1), generator=gen)]
    return torch.cat([torch.full((n, 1), names.index(BOS)), body], dim=1)


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


def test_model_equals_reference_programs(task, meta):
    """Argmax of the logits (circuit program) and of the distractor program's residual
    subspaces equal the plain-Python programs at every defined position."""
    names = meta["tokens"]
    tokens = torch.cat([task.clean, task.corrupted, _random_sequences(meta, 300, seed=1)])
    with torch.no_grad():
        logits, cache = task.model.run_with_cache(tokens)
    resid = cache["resid_post", 1]
    reads = {
        sop: (resid[..., meta["spaces"][sop]["index"]], meta["spaces"][sop]["value"])
        for sop in ("d0", "d1")
    }
    checked = 0
    for row in range(tokens.shape[0]):
        seq = [names[i] for i in tokens[row].tolist()]
        refs = {"two_back": reference_two_back(seq)}
        refs["d0"], refs["d1"] = reference_distractors(seq)
        for q in range(SEQ_LEN):
            if refs["two_back"][q] is not None:
                assert names[logits[row, q].argmax().item()] == refs["two_back"][q], (seq, q)
                checked += 1
            for sop, (read, values) in reads.items():
                if refs[sop][q] is not None:
                    assert values[read[row, q].argmax().item()] == refs[sop][q], (sop, seq, q)
    assert checked == tokens.shape[0] * (SEQ_LEN - 3)


def test_fields_and_shapes(task):
    assert task.name == "compiled_two_back"
    assert task.model.cfg.attn_only and task.model.cfg.n_layers >= 2
    assert task.clean.shape == task.corrupted.shape == (50, SEQ_LEN)
    assert task.negative_prompts is task.corrupted
    assert task.positions is not None and task.positions.shape == task.clean.shape
    assert task.positions[:, 6:].all() and not task.positions[:, :6].any()
    assert task.true_nodes == CIRCUIT
    assert task.true_edges == {"input->L0H0", "input->L1H1", "L0H0->L1H1", "L1H1->logits"}
    assert task.true_edges <= set(model_edges(task.model))
    assert set(model_heads(task.model)) == CIRCUIT | DISTRACTORS
    # context (positions 1..3) shared, task tokens a_j -> b_j
    assert torch.equal(task.clean[:, :4], task.corrupted[:, :4])
    assert (task.clean[:, 4:] != task.corrupted[:, 4:]).all()


def test_same_seed_same_prompts():
    a, b, c = (
        compiled_task(n_prompts=8, seed=2),
        compiled_task(n_prompts=8, seed=2),
        compiled_task(n_prompts=8, seed=5),
    )
    assert torch.equal(a.clean, b.clean) and torch.equal(a.corrupted, b.corrupted)
    assert not torch.equal(a.clean, c.clean)


def test_bad_arguments():
    with pytest.raises(ValueError, match="n_prompts"):
        compiled_task(n_prompts=0)
    with pytest.raises(ValueError, match="two_back"):
        load_compiled_model("sort")


def test_metric_and_circuit_ablations(task):
    with torch.no_grad():
        clean = task.metric(task.model(task.clean), task.clean)
        corrupted = task.metric(task.model(task.corrupted), task.clean)
    assert clean.shape == (50,)
    assert (clean > 4).all() and (corrupted < -4).all()
    for head in CIRCUIT:
        assert _ablated_metric(task, head).abs().max() < 1e-5, head
    for head in DISTRACTORS:
        assert (_ablated_metric(task, head) - clean).abs().max() < 1e-5, head


def test_heads_active_and_negatives_separate_circuit_only(task):
    with torch.no_grad():
        _, cache = task.model.run_with_cache(task.clean)
        _, cache_neg = task.model.run_with_cache(task.negative_prompts)
    acting = task.positions[0]
    for head in CIRCUIT | DISTRACTORS:
        layer, index = parse_head(head)
        z = cache["z", layer][:, acting, index]
        z_neg = cache_neg["z", layer][:, acting, index]
        assert z.abs().max() > 0.5, head  # active
        assert z.std(dim=0).max() > 0.1, head  # input-dependent
        gap = (z - z_neg).abs().max()
        assert gap > 0.5 if head in CIRCUIT else gap < 1e-4, (head, gap)


def test_circuit_attention_has_gradients(task):
    store = {}

    def keep(pattern, hook):
        pattern.retain_grad()
        store[hook.name] = pattern
        return pattern

    hooks = [(f"blocks.{layer}.attn.hook_pattern", keep) for layer in (0, 1)]
    logits = task.model.run_with_hooks(task.clean[:8], fwd_hooks=hooks)
    task.metric(logits, task.clean[:8]).sum().backward()
    for head in CIRCUIT:
        layer, index = parse_head(head)
        assert store[f"blocks.{layer}.attn.hook_pattern"].grad[:, index].abs().max() > 1e-3
