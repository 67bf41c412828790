"""Every method on the hand-built and compiled models, whose circuits are known by construction."""

from __future__ import annotations

import pytest

from tl_codebook.circuit_tasks.compiled import compiled_task
from tl_codebook.circuit_tasks.one_head import CARRIER, one_head_task
from tl_codebook.comparisons.circuits.compare import compare_methods, faithfulness_curve
from tl_codebook.comparisons.circuits.graph import CircuitGraph
from tl_codebook.comparisons.circuits.methods import METHODS, score_circuit


@pytest.fixture(scope="module")
def one_head_results():
    return compare_methods(one_head_task(), METHODS)


@pytest.mark.parametrize("method", [m for m in METHODS if m != "random"])
def test_every_method_ranks_the_one_carrying_head_first(one_head_results, method) -> None:
    (result,) = [r for r in one_head_results if r.method == method]
    nodes = result.scores.nodes
    assert max(nodes, key=nodes.__getitem__) == CARRIER
    assert all(nodes[CARRIER] > v for h, v in nodes.items() if h != CARRIER)
    assert result.node_auroc == 1.0 and result.precision_at_size == 1.0
    # keeping the one head restores the whole metric: f = 1 at every fraction, so CPR is the
    # x-range 0.999 and CMD 0 (MIB's trapezoid over 0.1%..100%)
    curve = result.curve("nodes", "resample")
    assert curve is not None
    assert curve.faithfulness == pytest.approx([1.0] * len(curve.fractions), abs=1e-4)
    assert curve.cpr == pytest.approx(0.999, abs=1e-4) and curve.cmd == pytest.approx(0.0, abs=1e-4)


def test_every_row_is_present_with_edges_where_a_method_has_them(one_head_results) -> None:
    rows = {r.method: r.row() for r in one_head_results}
    assert sorted(rows) == sorted(METHODS)
    assert rows["attribution_patching"]["edge_auroc"] is None
    for method in ("codes", "activation_patching", "eap", "eap_ig", "acdc", "random"):
        assert rows[method]["edge_auroc"] is not None
    for method in ("activation_patching", "eap", "eap_ig", "acdc"):
        assert rows[method]["edge_auroc"] == 1.0
    assert rows["acdc"]["forward_passes"] > rows["eap"]["forward_passes"] == 1


def test_acdc_keeps_exactly_the_carrying_path() -> None:
    task = one_head_task()
    scores = score_circuit(task, "acdc")
    assert sorted(scores.extra["kept_edges"]) == sorted(task.true_edges or ())


def test_compiled_program_circuit_is_found_by_every_method_but_random() -> None:
    task = compiled_task(n_prompts=20)
    graph = CircuitGraph.build(task)
    for method in METHODS:
        nodes = score_circuit(task, method, graph).nodes
        top_two = sorted(nodes, key=lambda h: (-nodes[h], h))[:2]
        if method != "random":
            assert sorted(top_two) == sorted(task.true_nodes or ()), method


def test_a_circuit_without_its_heads_is_unfaithful() -> None:
    # ranking the carrier last: the single kept head is a distractor, f = 0 until it is kept
    task = one_head_task()
    graph = CircuitGraph.build(task)
    scores = {"L0H0": 3.0, "L0H1": 2.0, "L1H1": 1.0, CARRIER: 0.0}
    curve = faithfulness_curve(graph, scores, "nodes")
    assert curve.faithfulness[:-1] == pytest.approx([0.0] * (len(curve.fractions) - 1), abs=1e-4)
    assert curve.faithfulness[-1] == pytest.approx(1.0)
    # trapezoid: only the last interval rises, from 0 at 0.5 to 1 at 1.0 -> area 0.25
    assert curve.cpr == pytest.approx(0.25, abs=1e-4)
