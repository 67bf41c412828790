"""The comparison's report directory: comparison.csv/.json/.md, details.json, plots, index.html.
Plots use matplotlib's object API (`Figure`, Agg canvas): no global backend is changed.

Files written by `write_report(result, out_dir)`:
`comparison.json` (the contract: a list of rows, one per method), `comparison.csv`,
`comparison.md` (the table and notes), `details.json` (config, per-latent densities, per-concept
scores, codebook agreement), `fve_vs_l0.png`, `ce_recovered_vs_l0.png`, `latent_density.png`,
`state_precision_recall.png`, `steering.png`, and `index.html` showing all of it.
"""

from __future__ import annotations

import html
import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from matplotlib.axes import Axes
from matplotlib.figure import Figure

from tl_codebook.comparisons.compare import ComparisonResult, _format
from tl_codebook.files import atomic_write_bytes, atomic_write_json, atomic_write_text

FIGURES = {
    "fve_vs_l0.png": "Explained variance (SAELens' R²) against L0",
    "ce_recovered_vs_l0.png": "CE loss score (SAELens' ce_loss_score) against L0",
    "latent_density.png": "Latent firing frequency (log10) on the evaluation tokens",
    "state_precision_recall.png": "Best latent per concept of the task: precision and recall",
    "steering.png": "Steering success: the target concept's best latent forced on",
}


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _colors(names: Sequence[str]) -> dict[str, Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return {name: cmap(i % 10) for i, name in enumerate(names)}


# -- single plots ---------------------------------------------------------------------------------


MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def plot_metric_vs_l0(ax: Axes, rows: list[dict[str, Any]], metric: str, label: str) -> None:
    """Each method a point (L0, metric); methods of one kind joined by a line in order of L0.

    Kinds get their own marker; a codebook trained by SAELens is drawn hollow and dashed, so it
    stays visible where it sits exactly on our own training of the same codebook.
    """
    kinds = list(dict.fromkeys(r.get("kind", r["method"]) for r in rows))
    colors = _colors(kinds)
    l0s: list[float] = []
    for i, kind in enumerate(kinds):
        points = sorted(
            (r["l0"], r[metric])
            for r in rows
            if r.get("kind", r["method"]) == kind
            and _finite(r.get("l0"))
            and _finite(r.get(metric))
        )
        if not points:
            continue
        xs, ys = zip(*points)
        l0s.extend(xs)
        hollow = kind == "codebook_saelens"
        ax.plot(
            xs,
            ys,
            linestyle="--" if hollow else "-",
            marker=MARKERS[i % len(MARKERS)],
            markersize=9 if hollow else 6,
            markerfacecolor="none" if hollow else colors[kind],
            color=colors[kind],
            label=kind,
        )
    ax.set_xlabel("L0 (active latents per token)")
    ax.set_ylabel(label)
    positive = [x for x in l0s if x > 0]
    if positive and max(positive) / min(positive) > 20:
        ax.set_xscale("log")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, "not computed", ha="center", va="center", transform=ax.transAxes)


def plot_densities(ax: Axes, result: ComparisonResult) -> None:
    """Step histograms of log10(latent firing frequency) per method (dead latents in the legend)."""
    names = [r["method"] for r in result.rows]
    kinds = {r["method"]: r.get("kind") for r in result.rows}
    colors = _colors(names)
    for name in names:
        hist = result.details.get(name, {}).get("density_histogram")
        if not hist:
            continue
        edges, counts = hist["log10_edges"], hist["counts"]
        ax.stairs(
            counts,
            edges,
            color=colors[name],
            linestyle="--" if kinds[name] == "codebook_saelens" else "-",
            label=f"{name} ({hist['dead']} dead)",
        )
    ax.set_xlabel("log10 firing frequency")
    ax.set_ylabel("latents")
    ax.grid(alpha=0.3)
    if ax.patches or ax.lines:
        ax.legend(fontsize=7)


def plot_state_precision_recall(axes: Sequence[Axes], result: ComparisonResult) -> None:
    """Per concept of the task (TokFSM: per state), the precision (first axes) and recall
    (second) of its best latent."""
    names = [
        r["method"] for r in result.rows if result.details.get(r["method"], {}).get("per_concept")
    ]
    colors = _colors(names)
    width = 0.8 / max(len(names), 1)
    for ax, key in zip(axes, ("precision", "recall")):
        for i, name in enumerate(names):
            per_concept = result.details[name]["per_concept"]
            xs = [s["concept"] + (i - (len(names) - 1) / 2) * width for s in per_concept]
            ys = [s[key] if _finite(s[key]) else 0.0 for s in per_concept]
            ax.bar(xs, ys, width=width, color=colors[name], label=name)
        ax.set_ylabel(f"best latent's {key}")
        ax.set_ylim(0, 1.05)
        ax.grid(alpha=0.3, axis="y")
        if not names:
            ax.text(0.5, 0.5, "no ground truth", ha="center", va="center", transform=ax.transAxes)
    axes[-1].set_xlabel("concept")
    if names:
        axes[0].legend(
            fontsize=7, ncol=min(4, len(names)), loc="lower left", bbox_to_anchor=(0, 1.02)
        )


def plot_steering(ax: Axes, rows: list[dict[str, Any]]) -> None:
    """Steering success per method, next to its no-intervention baseline."""
    shown = [r for r in rows if _finite(r.get("steering_success"))]
    xs = range(len(shown))
    ax.bar([x - 0.2 for x in xs], [r["steering_success"] for r in shown], 0.4, label="steered")
    ax.bar(
        [x + 0.2 for x in xs],
        [r["steering_baseline"] if _finite(r.get("steering_baseline")) else 0.0 for r in shown],
        0.4,
        label="spliced, not steered",
    )
    ax.set_xticks(list(xs), [r["method"] for r in shown], rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("continuation fits the target concept")
    ax.set_ylim(0, 1.05)
    ax.grid(alpha=0.3, axis="y")
    if shown:
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, "not computed", ha="center", va="center", transform=ax.transAxes)


# -- figures ----------------------------------------------------------------------------------


def summary_figure(result: ComparisonResult) -> Figure:
    """All plots in one Figure (what `ComparisonResult.plot()` returns)."""
    fig = Figure(figsize=(16, 9), layout="constrained")
    grid = fig.add_gridspec(2, 3)
    plot_metric_vs_l0(
        fig.add_subplot(grid[0, 0]), result.rows, "explained_variance", "explained variance"
    )
    plot_metric_vs_l0(fig.add_subplot(grid[0, 1]), result.rows, "ce_loss_score", "CE loss score")
    plot_densities(fig.add_subplot(grid[0, 2]), result)
    inner = grid[1, :2].subgridspec(2, 1)
    pr_axes = [fig.add_subplot(inner[0]), fig.add_subplot(inner[1])]
    plot_state_precision_recall(pr_axes, result)
    plot_steering(fig.add_subplot(grid[1, 2]), result.rows)
    return fig


def _single(draw: Any, size: tuple[float, float] = (6.5, 4.5), n_axes: int = 1) -> Figure:
    fig = Figure(figsize=size, layout="constrained")
    axes = [fig.add_subplot(n_axes, 1, i + 1) for i in range(n_axes)]
    draw(axes if n_axes > 1 else axes[0])
    return fig


def figures(result: ComparisonResult) -> dict[str, Figure]:
    """The report's figures by file name."""
    return {
        "fve_vs_l0.png": _single(
            lambda ax: plot_metric_vs_l0(
                ax, result.rows, "explained_variance", "explained variance"
            )
        ),
        "ce_recovered_vs_l0.png": _single(
            lambda ax: plot_metric_vs_l0(ax, result.rows, "ce_loss_score", "CE loss score")
        ),
        "latent_density.png": _single(lambda ax: plot_densities(ax, result)),
        "state_precision_recall.png": _single(
            lambda axes: plot_state_precision_recall(axes, result), size=(12.0, 6.0), n_axes=2
        ),
        "steering.png": _single(lambda ax: plot_steering(ax, result.rows)),
    }


# -- text -------------------------------------------------------------------------------------


def notes(result: ComparisonResult) -> list[str]:
    """Plain-language notes under the table: the budget, the baselines, the agreement."""
    cfg = result.config
    training = cfg.get("training", {})
    lines = []
    if training:
        lines.append(
            f"Hook `{training.get('hook_name')}`; every trained method saw "
            f"{training.get('training_tokens')} tokens in batches of {training.get('batch_size')} "
            f"(the same batches in the same order, seed {training.get('seed')}); excluded token ids: "
            f"{training.get('exclude_token_ids') or 'none'}."
        )
    lines.append(
        "Matched budget: "
        + ("yes" if result.matched_budget() else "NO")
        + " (train_tokens: "
        + ", ".join(f"{r['method']}={r.get('train_tokens')}" for r in result.rows)
        + ")."
    )
    if cfg.get("store"):
        lines.append(
            f"Training store `{cfg['store']}` ({cfg.get('store_tokens')} tokens), evaluation store "
            f"`{cfg.get('eval_store')}` ({cfg.get('eval_store_tokens')} tokens), model "
            f"`{cfg.get('model_name')}` (weights fingerprint {cfg.get('model_fingerprint')})."
        )
    lines.append(
        "Metrics are SAELens' own (sae_lens.evals.run_evals): ce_loss_score = (CE_ablation − "
        "CE_sae) / (CE_ablation − CE_clean), where ablation zeroes the activation at every "
        "position and the method replaces it at every non-excluded one; kl_div_with_sae = mean "
        "KL(clean ‖ spliced) over non-excluded positions; mse = mean over tokens of ‖x − x̂‖² "
        "(summed over dimensions); explained_variance = 1 − mse / total variance. Excluded "
        "tokens are left out of every mean. A latent is active when its activation is ≠ 0 (a "
        "codebook's chosen codes). fve, ce_loss_recovered and kl repeat explained_variance, "
        "ce_loss_score and kl_div_with_sae."
    )
    evaluation = cfg.get("evaluation", {})
    if any(_finite(r.get("steering_success")) for r in result.rows):
        where = {
            "last": "the task's steering positions (TokFSM: the prompt's last token)",
            "generation": "every position from there on that predicts a generated token",
        }
        lines.append(
            "Steering: each target concept's best latent (highest F1 on the evaluation tokens) is "
            f"forced at {where.get(evaluation.get('steering_positions'), 'the chosen positions')} of "
            f"{evaluation.get('steering_prompts')} task prompts in another concept, with the "
            "method spliced in (codebooks: the code is forced; SAEs: the latent is clamped to its "
            "mean active value); success is the task's check of the continuation (TokFSM: the "
            "next state is a successor of the target); steering_baseline is the same splice with "
            "nothing forced."
        )
    if any(r.get("init_tokens") for r in result.rows):
        lines.append(
            "Codebooks start from k-means on init_tokens activations sampled apart from the "
            "training stream (not counted in train_tokens); SAELens SAEs use SAELens' own "
            "initialisation."
        )
    for a in result.agreement:
        lines.append(
            f"Codebook trained by our trainer (`{a['ours']}`) vs by SAELens' SAETrainer "
            f"(`{a['saelens']}`): same codes on {a['same_codes_fraction']:.1%} of evaluation "
            f"tokens, largest code difference {a['max_code_difference']:.2g} of the largest code "
            f"norm, explained-variance difference {_fmt(a.get('explained_variance_difference'))}, "
            f"CE-loss-score difference {_fmt(a.get('ce_loss_score_difference'))}."
        )
    return lines


def _fmt(value: Any) -> str:
    return f"{value:+.2g}" if _finite(value) else "–"


def markdown(result: ComparisonResult) -> str:
    parts = ["# Codebooks vs SAEs on one activation store\n", result.to_markdown(), ""]
    parts += [f"- {line}" for line in notes(result)]
    return "\n".join(parts) + "\n"


def _html_table(result: ComparisonResult) -> str:
    columns = result.columns
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_format(r.get(c)))}</td>" for c in columns) + "</tr>"
        for r in result.rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def index_html(result: ComparisonResult) -> str:
    items = "".join(f"<li>{html.escape(line)}</li>" for line in notes(result))
    images = "".join(
        f'<figure><img src="{name}" alt="{html.escape(title)}"><figcaption>{html.escape(title)}'
        "</figcaption></figure>"
        for name, title in FIGURES.items()
    )
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>Codebooks vs SAEs</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; }}
table {{ border-collapse: collapse; font-size: 0.85em; }}
th, td {{ border: 1px solid #ccc; padding: 0.3em 0.5em; text-align: right; }}
th:first-child, td:first-child {{ text-align: left; }}
figure {{ display: inline-block; margin: 1em; }} img {{ max-width: 720px; }}
</style></head><body>
<h1>Codebooks vs SAEs on one activation store</h1>
{_html_table(result)}
<ul>{items}</ul>
<p>Data: <a href="comparison.json">comparison.json</a>, <a href="comparison.csv">comparison.csv</a>,
<a href="comparison.md">comparison.md</a>, <a href="details.json">details.json</a>.</p>
{images}
</body></html>
"""


def write_report(result: ComparisonResult, out_dir: str | Path) -> Path:
    """Write every report file into `out_dir` (created if needed), each one atomically (a killed
    run leaves every file whole, old or new); returns `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    result.to_json(out / "comparison.json")
    result.to_csv(out / "comparison.csv")
    atomic_write_text(out / "comparison.md", markdown(result))
    details = {"config": result.config, "agreement": result.agreement, "methods": result.details}
    atomic_write_json(out / "details.json", details)
    for name, fig in figures(result).items():
        png = io.BytesIO()
        fig.savefig(png, format="png", dpi=110)
        atomic_write_bytes(out / name, png.getvalue())
    atomic_write_text(out / "index.html", index_html(result))
    return out
