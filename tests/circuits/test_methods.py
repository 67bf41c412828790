"""Circuit methods on models whose answers can be worked out: a one-layer model whose metric is
linear in the head outputs (first-order methods are then exact), and method errors."""

from __future__ import annotations

import pytest
import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

from tl_codebook.comparisons.circuits.graph import CircuitGraph
from tl_codebook.comparisons.circuits.methods import (
    METHODS,
    score_circuit,
    total_variation,
    unique_to_positives,
)
from tl_codebook.comparisons.circuits.task import CircuitTask


def last_logit(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """The logit of token 0 at the last position: linear in the residual stream (no LN)."""
    return logits[:, -1, 0]


def linear_task() -> CircuitTask:
    torch.manual_seed(0)
    cfg = HookedTransformerConfig(
        n_layers=1, d_model=16, d_head=4, n_heads=3, n_ctx=6, d_vocab=7, attn_only=True,
        act_fn=None, normalization_type=None, seed=0,
    )  # fmt: skip
    model = HookedTransformer(cfg)
    gen = torch.Generator().manual_seed(2)
    clean = torch.randint(0, 7, (5, 6), generator=gen)
    corrupted = torch.randint(0, 7, (5, 6), generator=gen)
    return CircuitTask("linear", model, clean, corrupted, last_logit)


def test_first_order_methods_are_exact_where_the_metric_is_linear() -> None:
    # One layer, no normalisation: the metric is a linear function of each head's output, so
    # the gradient estimate of ablating a head (or a head->logits edge) is exact.
    task = linear_task()
    graph = CircuitGraph.build(task)
    exact = score_circuit(task, "activation_patching", graph)
    first_order = score_circuit(task, "attribution_patching", graph)
    eap = score_circuit(task, "eap", graph)
    ig = score_circuit(task, "eap_ig", graph)
    for head in exact.nodes:
        assert first_order.nodes[head] == pytest.approx(exact.nodes[head], abs=1e-5)
        edge = f"{head}->logits"
        assert eap.edges is not None and exact.edges is not None and ig.edges is not None
        assert eap.edges[edge] == pytest.approx(exact.edges[edge], abs=1e-5)
        assert ig.edges[edge] == pytest.approx(exact.edges[edge], abs=1e-5)
    assert first_order.passes.forward == 1 and first_order.passes.backward == 1
    assert exact.passes.forward == 3 + len(graph.edges) + 1  # heads, edges, the full run


def test_every_method_scores_every_head_and_edge_methods_every_edge() -> None:
    task = linear_task()
    graph = CircuitGraph.build(task)
    for method in METHODS:
        scores = score_circuit(task, method, graph)
        assert sorted(scores.nodes) == ["L0H0", "L0H1", "L0H2"]
        if scores.edges is not None:
            assert sorted(scores.edges) == sorted(graph.edges)
        assert scores.seconds >= 0.0
    assert score_circuit(task, "attribution_patching", graph).edges is None


def test_random_is_seeded() -> None:
    task = linear_task()
    graph = CircuitGraph.build(task)
    assert score_circuit(task, "random", graph).nodes == score_circuit(task, "random", graph).nodes


def test_unknown_method_lists_the_methods() -> None:
    with pytest.raises(ValueError, match="codes, activation_patching, attribution_patching"):
        score_circuit(linear_task(), "ioi_magic")


def test_a_metric_that_ignores_the_model_is_refused_by_gradient_methods() -> None:
    task = linear_task()
    task.metric = lambda logits, tokens: torch.zeros(logits.shape[0]) + 0.0 * logits.detach().sum()
    with pytest.raises(ValueError, match="does not depend on the model"):
        score_circuit(task, "eap")


def test_total_variation_and_unique_codes_known_answers() -> None:
    # positives 0,0,1,2 -> (1/2, 1/4, 1/4, 0); negatives 2,3 -> (0, 0, 1/2, 1/2)
    # TV = 1/2 (1/2 + 1/4 + 1/4 + 1/2) = 3/4; codes 0 and 1 occur only on positives
    positive, negative = torch.tensor([0, 0, 1, 2]), torch.tensor([2, 3])
    assert total_variation(positive, negative, 4) == pytest.approx(0.75)
    assert total_variation(positive, positive, 4) == 0.0
    assert unique_to_positives(positive, negative) == 2.0


def test_prompts_of_different_lengths_and_unknown_heads_are_refused() -> None:
    task = linear_task()
    with pytest.raises(ValueError, match="same shape"):
        CircuitTask("bad", task.model, task.clean, task.corrupted[:, :-1], last_logit)
    with pytest.raises(ValueError, match=r"L3H0.*its heads are"):
        CircuitTask("bad", task.model, task.clean, task.corrupted, last_logit,
                    true_nodes=frozenset({"L3H0"}))  # fmt: skip
    with pytest.raises(ValueError, match="not edges"):
        CircuitTask("bad", task.model, task.clean, task.corrupted, last_logit,
                    true_edges=frozenset({"L0H0->L0H1"}))  # fmt: skip


def test_a_metric_with_zero_gradient_is_refused_by_gradient_methods() -> None:
    # computed from the logits, but flat: its gradient is zero everywhere
    task = linear_task()
    task.metric = lambda logits, tokens: 0.0 * logits[:, -1, 0]
    with pytest.raises(ValueError, match="gradient is zero"):
        score_circuit(task, "attribution_patching")
