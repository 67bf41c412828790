"""Every method on every task, scored one way: node and edge AUROC against the true circuit,
precision and recall at its size, MIB faithfulness under two ablations, cost, and the node AUROC
as prompts are added. What `tl-codebook circuits` writes to circuits.json, and the Python API
for one's own model and task.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from tqdm.auto import tqdm

from tl_codebook.comparisons.circuits.graph import ABLATIONS, CircuitGraph
from tl_codebook.comparisons.circuits.methods import (
    METHODS,
    RANDOM_DRAWS,
    CircuitScores,
    MethodOptions,
    random_scores,
    score_circuit,
)
from tl_codebook.comparisons.circuits.scores import (
    FRACTIONS,
    circuit_size,
    cpr_cmd,
    normalized_faithfulness,
    pr_auc,
    precision_recall_at_k,
    rank,
    roc_auc,
)
from tl_codebook.comparisons.circuits.task import CircuitTask
from tl_codebook.configs import check_choice


@dataclass
class FaithfulnessCurve:
    """MIB's faithfulness f at each fraction of the graph kept (the method's top-ranked items),
    and its areas CPR (higher is better) and CMD (lower is better)."""

    level: str
    """"nodes" (heads kept) or "edges" (edges kept)."""
    ablation: str
    fractions: list[float]
    sizes: list[int]
    faithfulness: list[float]
    cpr: float
    cmd: float


def faithfulness_curve(
    graph: CircuitGraph,
    scores: dict[str, float],
    level: str,
    fractions: Sequence[float] = FRACTIONS,
) -> FaithfulnessCurve:
    """The faithfulness of circuits made of the top-scored heads (level "nodes") or edges
    (level "edges") at each fraction, ablating everything else by `graph.ablation`.

    Raises:
        ValueError: for an unknown level, or a task whose metric is the same with the whole
            model and with nothing (faithfulness undefined).
    """
    check_choice("faithfulness level", level, ("nodes", "edges"))
    order = rank(scores)

    def mask(kept: list[str]) -> Any:
        return graph.mask_of_nodes(kept) if level == "nodes" else graph.mask_of_edges(kept)

    m_full = graph.baseline("full")
    m_empty = graph.baseline("input_only" if level == "nodes" else "empty")
    sizes = [circuit_size(f, len(order)) for f in fractions]
    seen: dict[int, float] = {}
    values = []
    for size in sizes:
        if size not in seen:
            m = graph.metric(mask(order[:size]))
            seen[size] = normalized_faithfulness(m, m_empty, m_full)
        values.append(seen[size])
    cpr, cmd = cpr_cmd(list(fractions), values)
    return FaithfulnessCurve(level, graph.ablation, list(fractions), sizes, values, cpr, cmd)


@dataclass
class MethodResult:
    """One method on one task: its scores, their agreement with the truth, their faithfulness."""

    task: str
    method: str
    scores: CircuitScores
    n_examples: int
    node_auroc: float | None
    node_pr_auc: float | None
    edge_auroc: float | None
    precision_at_size: float | None
    recall_at_size: float | None
    curves: list[FaithfulnessCurve] = field(default_factory=list)

    def curve(self, level: str, ablation: str) -> FaithfulnessCurve | None:
        """The faithfulness curve at `level` under `ablation`, if measured."""
        for curve in self.curves:
            if curve.level == level and curve.ablation == ablation:
                return curve
        return None

    def row(self) -> dict[str, Any]:
        """The circuits.json row: `cpr`/`cmd` are node-level under resample ablation (every
        method has node scores), `*_mean` under mean ablation, `edge_*` over edges."""

        def area(level: str, ablation: str, which: str) -> float | None:
            curve = self.curve(level, ablation)
            return None if curve is None else getattr(curve, which)

        return {
            "task": self.task,
            "method": self.method,
            "n_examples": self.n_examples,
            "node_auroc": self.node_auroc,
            "node_pr_auc": self.node_pr_auc,
            "edge_auroc": self.edge_auroc,
            "precision_at_size": self.precision_at_size,
            "recall_at_size": self.recall_at_size,
            "cpr": area("nodes", "resample", "cpr"),
            "cmd": area("nodes", "resample", "cmd"),
            "cpr_mean": area("nodes", "mean", "cpr"),
            "cmd_mean": area("nodes", "mean", "cmd"),
            "edge_cpr": area("edges", "resample", "cpr"),
            "edge_cmd": area("edges", "resample", "cmd"),
            "edge_cpr_mean": area("edges", "mean", "cpr"),
            "edge_cmd_mean": area("edges", "mean", "cmd"),
            "seconds": self.scores.seconds,
            "forward_passes": self.scores.passes.forward,
            "backward_passes": self.scores.passes.backward,
            **{k: v for k, v in self.scores.extra.items() if isinstance(v, int | float)},
        }


def _defined(task: CircuitTask, truth: frozenset[str] | None, n_items: int) -> bool:
    return truth is not None and 0 < len(truth) < n_items


def evaluate(
    task: CircuitTask,
    scores: CircuitScores,
    graphs: dict[str, CircuitGraph] | None = None,
    faithfulness: bool = True,
) -> MethodResult:
    """Score one method's output on `task`: AUROCs and precision/recall where the task knows
    its circuit (None where it does not), and faithfulness curves under each ablation in
    `graphs` (built here when None)."""
    nodes_known = _defined(task, task.true_nodes, len(scores.nodes))
    edges_known = scores.edges is not None and _defined(task, task.true_edges, len(scores.edges))
    node_auroc = roc_auc(scores.nodes, task.true_nodes) if nodes_known else None  # type: ignore[arg-type]
    node_pr = pr_auc(scores.nodes, task.true_nodes) if nodes_known else None  # type: ignore[arg-type]
    precision, recall = (
        precision_recall_at_k(scores.nodes, task.true_nodes)  # type: ignore[arg-type]
        if nodes_known
        else (None, None)
    )
    edge_auroc = roc_auc(scores.edges, task.true_edges) if edges_known else None  # type: ignore[arg-type]
    result = MethodResult(
        task.name, scores.method, scores, task.n, node_auroc, node_pr, edge_auroc, precision, recall
    )
    for key, other in list(scores.extra.items()):  # alternative node scores (codes: unique)
        if key.endswith("_scores") and isinstance(other, dict) and nodes_known:
            scores.extra[f"node_auroc_{key.removesuffix('_scores')}"] = roc_auc(
                other,
                task.true_nodes,  # type: ignore[arg-type]
            )
    if scores.method == "random" and (nodes_known or edges_known):
        result.scores.extra.update(_random_expectation(task, graphs, nodes_known, edges_known))
    if faithfulness:
        graphs = (
            graphs if graphs is not None else {a: CircuitGraph.build(task, a) for a in ABLATIONS}
        )
        for graph in graphs.values():
            result.curves.append(faithfulness_curve(graph, scores.nodes, "nodes"))
            if scores.edges is not None:
                result.curves.append(faithfulness_curve(graph, scores.edges, "edges"))
    return result


def _random_expectation(
    task: CircuitTask,
    graphs: dict[str, CircuitGraph] | None,
    nodes_known: bool,
    edges_known: bool,
) -> dict[str, float]:
    """The chance baseline's expected AUROC and its spread: the mean and standard deviation
    over `RANDOM_DRAWS` random rankings (one draw on eight heads is noisy: sd near 0.15)."""
    graph = (graphs or {}).get("resample") or CircuitGraph.build(task)
    node_values, edge_values = [], []
    for draw in range(RANDOM_DRAWS):
        nodes, edges = random_scores(graph, draw)
        if nodes_known:
            node_values.append(roc_auc(nodes, task.true_nodes))  # type: ignore[arg-type]
        if edges_known:
            edge_values.append(roc_auc(edges, task.true_edges))  # type: ignore[arg-type]
    out = {}
    for key, values in (("node_auroc", node_values), ("edge_auroc", edge_values)):
        if values:
            out[f"{key}_over_draws"] = statistics.mean(values)
            out[f"{key}_sd_over_draws"] = statistics.stdev(values)
    return out


def check_methods(methods: Iterable[str]) -> list[str]:
    """`methods` as a list, each checked against `METHODS` (a ValueError lists the valid ones)."""
    chosen = list(methods)
    for method in chosen:
        check_choice("circuit method", method, METHODS)
    return chosen


def compare_methods(
    task: CircuitTask,
    methods: Iterable[str] = METHODS,
    options: MethodOptions | None = None,
    faithfulness: bool = True,
) -> list[MethodResult]:
    """Run each of `methods` on `task` with one shared graph per ablation, and evaluate it.

    The Python API for one's own model and task: build a `CircuitTask` (model, clean and
    corrupted prompts, metric, and the true circuit if known) and call this.

    Raises:
        ValueError: for an unknown method name (the message lists them).
    """
    chosen = check_methods(methods)
    graphs = {ablation: CircuitGraph.build(task, ablation) for ablation in ABLATIONS}
    results = []
    for method in tqdm(chosen, desc=f"circuits: {task.name}", leave=False):
        scores = score_circuit(task, method, graphs["resample"], options)
        results.append(evaluate(task, scores, graphs, faithfulness))
    return results


def auroc_by_examples(
    task: CircuitTask,
    counts: Sequence[int],
    methods: Iterable[str] = METHODS,
    options: MethodOptions | None = None,
) -> list[dict[str, Any]]:
    """Node AUROC (and edge AUROC) of each method on the first n prompts, for each n in
    `counts` (no faithfulness: this asks how many examples a method needs)."""
    rows = []
    chosen = check_methods(methods)
    for n in counts:
        if n > task.n:
            continue
        small = task.subset(n)
        graph = CircuitGraph.build(small)
        for method in chosen:
            scores = score_circuit(small, method, graph, options)
            result = evaluate(small, scores, {"resample": graph}, faithfulness=False)
            rows.append(
                {
                    "task": task.name,
                    "method": method,
                    "n_examples": n,
                    "node_auroc": result.node_auroc,
                    "edge_auroc": result.edge_auroc,
                    "seconds": result.scores.seconds,
                    **{
                        k: v
                        for k, v in result.scores.extra.items()
                        if k.startswith("node_auroc_") and isinstance(v, float)
                    },
                }
            )
    return rows


def task_family(task: str) -> str:
    """The family of a task name, its seeds grouped: "induction_seed1" -> "induction" (what
    the summary and the report's per-family figures group by)."""
    return task.split("_seed")[0]


def summarize(rows: list[dict[str, Any]], group: Callable[[str], str]) -> list[dict[str, Any]]:
    """Mean and standard deviation of each numeric field over the rows whose task falls in the
    same `group(task)` (e.g. the seeds of one task), per method."""
    buckets: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        buckets.setdefault((group(row["task"]), row["method"]), []).append(row)
    out = []
    for (task, method), members in buckets.items():
        summary: dict[str, Any] = {"task": task, "method": method, "n_tasks": len(members)}
        for key in ("node_auroc", "edge_auroc", "cpr", "cmd", "seconds"):
            values = [m[key] for m in members if m.get(key) is not None]
            if values:
                summary[f"{key}_mean"] = statistics.mean(values)
                summary[f"{key}_sd"] = statistics.stdev(values) if len(values) > 1 else 0.0
        out.append(summary)
    return out
