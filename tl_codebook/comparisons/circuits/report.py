"""The circuit comparison's report: ROC, faithfulness, cost and examples plots, and an
index.html that says what each figure means, all from what circuits.json holds.
"""

from __future__ import annotations

import html
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tl_codebook.analysis.plots import _figure, _save
from tl_codebook.comparisons.circuits.compare import MethodResult, task_family
from tl_codebook.comparisons.circuits.scores import roc_curve
from tl_codebook.files import atomic_write_text, json_ready

COLOURS = {
    "codes": "#d62728",
    "activation_patching": "#1f77b4",
    "attribution_patching": "#17becf",
    "eap": "#2ca02c",
    "eap_ig": "#98df8a",
    "acdc": "#9467bd",
    "random": "#7f7f7f",
}


def _by_task(results: Sequence[MethodResult]) -> dict[str, list[MethodResult]]:
    tasks: dict[str, list[MethodResult]] = {}
    for result in results:
        tasks.setdefault(result.task, []).append(result)
    return tasks


def plot_roc(results: Sequence[MethodResult], path: Path, truths: dict[str, Any]) -> Path | None:
    """Node ROC curves, one panel per task with a known circuit, one line per method."""
    tasks = {t: rs for t, rs in _by_task(results).items() if rs[0].node_auroc is not None}
    if not tasks:
        return None
    n_rows, n_cols = _panels(len(tasks))
    fig = _figure((4.2 * n_cols, 3.6 * n_rows))
    for i, (task, members) in enumerate(tasks.items()):
        ax = fig.add_subplot(n_rows, n_cols, i + 1)
        for result in members:
            fpr, tpr = roc_curve(result.scores.nodes, truths[task])
            ax.plot(
                fpr,
                tpr,
                label=f"{result.method} {result.node_auroc:.2f}",
                color=COLOURS.get(result.method),
                lw=1.5,
            )
        ax.plot([0, 1], [0, 1], ls=":", color="black", lw=0.8)
        ax.set_title(task, fontsize=9)
        ax.set_xlabel("false-positive rate (heads)")
        ax.set_ylabel("true-positive rate")
        ax.legend(fontsize=6, loc="lower right")
    return _save(fig, path)


def plot_faithfulness(results: Sequence[MethodResult], path: Path) -> Path | None:
    """Node-level faithfulness against the fraction of heads kept (resample ablation)."""
    tasks = _by_task(results)
    if not tasks:
        return None
    n_rows, n_cols = _panels(len(tasks))
    fig = _figure((4.2 * n_cols, 3.6 * n_rows))
    for i, (task, members) in enumerate(tasks.items()):
        ax = fig.add_subplot(n_rows, n_cols, i + 1)
        for result in members:
            curve = result.curve("nodes", "resample")
            if curve is None:
                continue
            ax.plot(
                curve.fractions,
                curve.faithfulness,
                marker="o",
                ms=3,
                label=f"{result.method} CPR {curve.cpr:.2f}",
                color=COLOURS.get(result.method),
            )
        ax.axhline(1.0, ls=":", color="black", lw=0.8)
        ax.set_xscale("log")
        ax.set_title(task, fontsize=9)
        ax.set_xlabel("fraction of heads kept")
        ax.set_ylabel("faithfulness f")
        ax.legend(fontsize=6)
    return _save(fig, path)


def plot_scaling(rows: Sequence[dict[str, Any]], path: Path) -> Path | None:
    """Seconds against the number of heads, one line per method (log-log)."""
    if not rows:
        return None
    fig = _figure((5.0, 3.8))
    ax = fig.add_subplot(1, 1, 1)
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        ax.plot(
            [r["heads"] for r in mine],
            [max(r["seconds"], 1e-4) for r in mine],
            marker="o",
            label=method,
            color=COLOURS.get(method),
        )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("heads in the model (two layers)")
    ax.set_ylabel("seconds")
    ax.legend(fontsize=7)
    return _save(fig, path)


def _panels(n: int) -> tuple[int, int]:
    """(rows, columns) of a grid of `n` panels, at most three to a row."""
    columns = min(n, 3)
    return (n + columns - 1) // columns, columns


def plot_examples(rows: Sequence[dict[str, Any]], path: Path) -> Path | None:
    """Node AUROC against the number of prompts, one panel per task family, one line per
    method (the mean over the family's seeds; random: its expectation over many draws)."""
    rows = [r for r in rows if r["node_auroc"] is not None]
    if not rows:
        return None
    families = list(dict.fromkeys(task_family(r["task"]) for r in rows))
    n_rows, n_cols = _panels(len(families))
    fig = _figure((4.2 * n_cols, 3.6 * n_rows))
    for i, family in enumerate(families):
        ax = fig.add_subplot(n_rows, n_cols, i + 1)
        mine = [r for r in rows if task_family(r["task"]) == family]
        counts = sorted({r["n_examples"] for r in mine})
        for method in dict.fromkeys(r["method"] for r in mine):
            means = []
            for n in counts:
                values = [
                    r.get("node_auroc_over_draws", r["node_auroc"])
                    for r in mine
                    if r["method"] == method and r["n_examples"] == n
                ]
                means.append(sum(values) / len(values))
            ax.plot(counts, means, marker="o", label=method, color=COLOURS.get(method))
        ax.axhline(0.5, ls=":", color="black", lw=0.8)
        ax.set_xscale("log")
        ax.set_xticks(counts, [str(c) for c in counts])
        ax.minorticks_off()
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(family, fontsize=9)
        ax.set_xlabel("prompts")
        ax.set_ylabel("node AUROC")
        ax.legend(fontsize=6)
    return _save(fig, path)


def _fmt(value: Any) -> str:
    if value is None:
        return "&ndash;"
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 100 else f"{value:.0f}"
    return html.escape(str(value))


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _findings(data: dict[str, Any]) -> str:
    """Sentences computed from the rows: per task family, the codes method's node AUROC against
    the best other method's, its time against ACDC's, and the chance baseline's expectation."""
    items = []
    rows = data["rows"]
    for family in dict.fromkeys(task_family(r["task"]) for r in rows):
        mine = [r for r in rows if task_family(r["task"]) == family]

        def mean(method: str, key: str, members: list[dict[str, Any]] = mine) -> float | None:
            values = [r[key] for r in members if r["method"] == method and r.get(key) is not None]
            return sum(values) / len(values) if values else None

        codes = mean("codes", "node_auroc")
        if codes is None:
            continue
        others = {
            m: v
            for m in dict.fromkeys(r["method"] for r in mine)
            if m not in ("codes", "random") and (v := mean(m, "node_auroc")) is not None
        }
        text = f"<b>{html.escape(family)}</b>: codes node AUROC {codes:.2f}"
        unique = mean("codes", "node_auroc_unique")
        if unique is not None:
            text += f" (O'Neill &amp; Bui's unique-code count: {unique:.2f})"
        if others:
            best = max(others, key=others.__getitem__)
            text += f"; best other method {best} {others[best]:.2f}"
        codes_s, acdc_s = mean("codes", "seconds"), mean("acdc", "seconds")
        if codes_s is not None and acdc_s:
            text += f"; codes took {codes_s / acdc_s:.2f}&times; ACDC's time"
        chance = mean("random", "node_auroc_over_draws")
        if chance is not None:
            text += (
                f"; random {mean('random', 'node_auroc'):.2f} for this run's draw, "
                f"{chance:.2f} on average over many draws"
            )
        items.append(f"<li>{text}.</li>")
    return f"<ul>{''.join(items)}</ul>"


def _notes_html(notes: Any, truth: Any) -> str:
    """A task's notes as HTML: per-head score tables as tables (with a column saying which
    heads the truth holds), lists as lists, anything else as JSON text."""
    if not isinstance(notes, dict):
        return f"<pre>{html.escape(json.dumps(json_ready(notes), indent=1))}</pre>"
    parts = []
    for key, value in notes.items():
        label = html.escape(key.replace("_", " "))
        if key == "head_scores" and isinstance(value, dict):
            fields = sorted({f for scores in value.values() for f in scores})
            rows = [
                [head, *[scores.get(f) for f in fields], "yes" if truth and head in truth else ""]
                for head, scores in value.items()
            ]
            parts.append(f"<p>{label}:</p>" + _table(["head", *fields, "in truth"], rows))
        elif isinstance(value, list):
            items = "".join(f"<li>{html.escape(str(v))}</li>" for v in value) or "<li>none</li>"
            parts.append(f"<p>{label}:</p><ul>{items}</ul>")
        elif isinstance(value, dict):
            text = json.dumps(json_ready(value, digits=4), indent=1)
            parts.append(
                f"<details><summary>{label}</summary><pre>{html.escape(text)}</pre></details>"
            )
        else:
            parts.append(f"<p>{label}: {html.escape(str(value))}</p>")
    return "".join(parts)


COLUMNS = [
    "task",
    "method",
    "n_examples",
    "node_auroc",
    "node_pr_auc",
    "edge_auroc",
    "precision_at_size",
    "recall_at_size",
    "cpr",
    "cmd",
    "cpr_mean",
    "cmd_mean",
    "edge_cpr",
    "edge_cmd",
    "seconds",
    "forward_passes",
    "backward_passes",
]


def write_report(
    out: Path,
    data: dict[str, Any],
    results: Sequence[MethodResult],
    truths: dict[str, Any],
) -> Path:
    """Write the plots and index.html for `data` (what circuits.json holds) under `out`."""
    plots = {
        "roc": plot_roc(results, out / "roc.png", truths),
        "faithfulness": plot_faithfulness(results, out / "faithfulness.png"),
        "scaling": plot_scaling(data.get("scaling", []), out / "scaling.png"),
        "examples": plot_examples(data.get("examples", []), out / "examples.png"),
    }
    rows = [[row.get(c) for c in COLUMNS] for row in data["rows"]]
    summary = data.get("summary", [])
    summary_rows = [
        [
            s["task"],
            s["method"],
            s["n_tasks"],
            f"{s.get('node_auroc_mean', float('nan')):.3f} ± {s.get('node_auroc_sd', 0.0):.3f}"
            if "node_auroc_mean" in s
            else None,
            f"{s.get('edge_auroc_mean', float('nan')):.3f} ± {s.get('edge_auroc_sd', 0.0):.3f}"
            if "edge_auroc_mean" in s
            else None,
            s.get("cpr_mean"),
            s.get("seconds_mean"),
        ]
        for s in summary
    ]
    notes = "".join(
        f"<h3>{html.escape(task)}</h3>{_notes_html(task_notes, truths.get(task))}"
        for task, task_notes in data.get("task_notes", {}).items()
    )

    def img(key: str, caption: str) -> str:
        plot = plots[key]
        if plot is None:
            return ""
        return f"<figure><img src='{plot.name}' alt='{key}'><figcaption>{caption}</figcaption></figure>"

    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>Circuits: codes against
circuit discovery</title><style>body{{font-family:sans-serif;max-width:1200px;margin:auto}}
table{{border-collapse:collapse;font-size:12px}}td,th{{border:1px solid #ccc;padding:2px 5px}}
img{{max-width:100%}}pre{{font-size:11px;white-space:pre-wrap}}</style></head><body>
<h1>Which heads and edges carry a task: codes against circuit-discovery methods</h1>
<p>Each method scores every attention head (node) and, where it has them, every edge from a
sender (the embeddings or a head) into a later head's query/key/value input or into the logits.
Scores are compared with the task's true circuit (node and edge ROC AUC: the chance that a true
item outranks a false one; 0.5 is chance, which the <b>random</b> row shows) and by MIB's
faithfulness: keep the top-scored heads (or edges), ablate the rest, and measure
f = (m(C) &minus; m(&empty;)) / (m(full) &minus; m(&empty;)) at 0.1&ndash;100% of the graph;
CPR is the area under f (higher is better), CMD the area under |1 &minus; f| (lower is better).
<b>cpr/cmd</b> are over heads with resample ablation (each removed head or edge reads its output
on the paired corrupted prompt); <b>_mean</b> columns use mean ablation; <b>edge_</b> columns rank
edges. Seconds exclude the shared graph (two forward passes caching clean and ablated outputs)
that every method but codes reads.</p>
<p><b>What a code score cannot see:</b> the codes method compares each head's code histogram on
positive (clean) and negative prompts. A head that acts alike on both, such as a previous-token
head whose output is the same kind of thing whether or not the sequence repeats, scores near
zero however much the circuit needs it. The patching and attribution methods see such heads,
since they measure effects on the metric. The converse holds too: a head that reacts to the
task without carrying it (a duplicate-token head beside an induction circuit) can score high.</p>
<h2>What the numbers say</h2>{_findings(data)}
<h2>Every task and method</h2>{_table(COLUMNS, rows)}
<h2>Over seeds (mean ± standard deviation)</h2>{
        _table(
            ["task", "method", "tasks", "node AUROC", "edge AUROC", "CPR", "seconds"], summary_rows
        )
    }
<h2>Figures</h2>
{img("roc", "Node ROC curves per task (legend: AUROC). The dotted diagonal is chance.")}
{
        img(
            "faithfulness",
            "Faithfulness against the fraction of heads kept, resample ablation: a "
            "method whose top heads alone restore the metric reaches f = 1 early.",
        )
    }
{
        img(
            "examples",
            "Node AUROC against the number of prompts a method saw (O'Neill & Bui claim "
            "5&ndash;10 suffice for codes).",
        )
    }
{
        img(
            "scaling",
            "Wall time against the number of heads, on random attention-only models of "
            "growing width: exact patching and ACDC grow with the number of edges (one forward pass "
            "each), attribution methods stay at a few passes, codes at three forwards and k-means.",
        )
    }
<h2>How each task's truth was fixed</h2>{notes}
</body></html>"""
    return atomic_write_text(out / "index.html", page)
