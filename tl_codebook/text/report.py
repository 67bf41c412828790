"""The LM demo's report: `index.html` beside metrics.json, rewritten after every phase, so a
killed run shows what it finished. It holds the contract numbers against the issue's targets and
the paper's figures, the concept codes, the steering results per topic and condition with example
generations, the training curve and a link to the code browser.
"""

from __future__ import annotations

import html
import math
from pathlib import Path
from typing import Any

from tl_codebook.analysis.plots import plot_grouped_bars, plot_training_curves
from tl_codebook.files import atomic_write_text

TARGETS: dict[str, tuple[str, float]] = {
    "ce_loss_recovered": (">=", 0.9),
    "delta_loss": ("<=", 0.5),
    "dead_fraction": ("<=", 0.2),
    "steering_success": (">=", 0.6),
}
"""The issue's targets for the CPU default."""

PAPER = {
    "dead_fraction": "0.198 (released TinyStories 1-layer model)",
    "steering_success": "topic word in the text, 10 samples (tutorial; no rate reported)",
}
"""What the paper (or its reference code) reports on the same measure."""

EXAMPLES_PER_CELL = 2


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "n/a" if not math.isfinite(value) else f"{value:.3f}"
    if value is None:
        return "not measured yet"
    return html.escape(str(value))


def _mark(key: str, value: Any) -> str:
    if key not in TARGETS or not isinstance(value, (int, float)):
        return ""
    op, target = TARGETS[key]
    ok = value >= target if op == ">=" else value <= target
    return " ✓" if ok else " ✗"


def _plots(out: Path, metrics: dict[str, Any]) -> dict[str, str]:
    plots: dict[str, str] = {}
    history = (metrics.get("training") or {}).get("history") or []
    curves = {key: [h[key] for h in history if key in h] for key in ("loss", "kl", "lm_loss")}
    curves = {k: v for k, v in curves.items() if v}
    if curves:
        steps = {k: [int(h["step"]) for h in history if k in h] for k in curves}
        plot_training_curves(
            curves, out / "training.png", title="Codebook training", ylabel="loss", steps=steps
        )
        plots["training"] = "training.png"
    conditions = ((metrics.get("steering") or {}).get("conditions")) or {}
    if conditions:
        topics = sorted({t for c in conditions.values() for t in c.get("per_topic", {})})
        groups = {t: {c: v["per_topic"].get(t, 0.0) for c, v in conditions.items()} for t in topics}
        plot_grouped_bars(
            groups, out / "steering.png", title="Steered (on topic and fluent)", ylabel="fraction"
        )
        plots["steering"] = "steering.png"
    return plots


def _code(match: dict[str, Any]) -> str:
    if not match or match.get("hook") is None:
        return "none"
    return f"{html.escape(str(match['hook']))} head {match.get('group')} code {match.get('code')}"


def _versus(conditions: dict[str, Any]) -> str:
    """The codebook's steering rate against each other condition's, with the standard error of
    the difference: whether it is told apart from noise, and so who wins."""
    from tl_codebook.text.judge import rate_difference

    mine = conditions.get("codebook") or {}
    if not isinstance(mine.get("steered"), (int, float)) or not mine.get("n"):
        return ""
    items = []
    for name, other in conditions.items():
        if name == "codebook" or not isinstance(other.get("steered"), (int, float)):
            continue
        if not other.get("n"):  # a run from before summaries recorded their trial count
            continue
        diff, se = rate_difference(mine["steered"], mine["n"], other["steered"], other["n"])
        verdict = (
            "within two standard errors: no difference shown"
            if abs(diff) <= 2 * se
            else ("the codebook steers better" if diff > 0 else f"{name} steers better")
        )
        items.append(
            f"<li>codebook &minus; {html.escape(name)}: {diff:+.2f} &plusmn; {se:.2f} ({verdict})</li>"
        )
    if not items:
        return ""
    return (
        f"<p>Differences in the steered rate ({mine['n']} generations a condition; &plusmn; one "
        "standard error):</p><ul>" + "".join(items) + "</ul>"
    )


def _table(headers: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{h}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _html(metrics: dict[str, Any], plots: dict[str, str]) -> str:
    from tl_codebook.text.experiment import CONTRACT_KEYS, PRECISE

    cfg = metrics.get("config", {})
    parts = [
        "<!doctype html><meta charset='utf-8'><title>tl_codebook LM demo</title>",
        "<style>body{font-family:sans-serif;max-width:70em;margin:2em auto}td,th{border:1px solid #ccc;"
        "padding:3px 8px;vertical-align:top}table{border-collapse:collapse;margin:1em 0}"
        ".gen{font-family:monospace;white-space:pre-wrap;max-width:40em}</style>",
        "<h1>Codebook features on a pretrained language model</h1>",
        f"<p>Status: <b>{_fmt(metrics.get('status'))}</b>; {_fmt(metrics.get('seconds'))} s. Model "
        f"<code>{_fmt(cfg.get('model'))}</code>, corpus <code>{_fmt(cfg.get('corpus'))}</code>; codebooks at "
        f"<code>{_fmt(cfg.get('site'))}</code> of layers {_fmt(cfg.get('layers'))}: {_fmt(cfg.get('num_codes'))} codes, "
        f"k = {_fmt(cfg.get('k'))}, {_fmt(cfg.get('mode'))}, {_fmt(cfg.get('steps'))} steps of "
        f"{_fmt(cfg.get('batch_size'))} x {_fmt(cfg.get('seq_len'))} tokens.</p>",
        "<h2>Headline numbers</h2>",
    ]
    rows = []
    for key in CONTRACT_KEYS:
        op, target = TARGETS.get(key, ("", None))
        rows.append(
            [
                f"<code>{key}</code>",
                _fmt(metrics.get(key)) + _mark(key, metrics.get(key)),
                f"{op} {target}" if target is not None else "",
                html.escape(PAPER.get(key, "")),
            ]
        )
    parts.append(_table(["metric", "this run", "target", "paper / reference"], rows))
    lm = metrics.get("lm") or {}
    if lm:
        parts.append(
            f"<p>Held-out loss over {_fmt(lm.get('eval_tokens'))} tokens: base {_fmt(lm.get('base_loss'))}, "
            f"with codebooks {_fmt(lm.get('codebook_loss'))}, every codebook site zero-ablated "
            f"{_fmt(lm.get('zero_ablated_loss'))}. <code>ce_loss_recovered</code> is SAELens' "
            "<code>ce_loss_score</code>: (zero-ablated - codebooks) / (zero-ablated - base).</p>"
        )
    if "training" in plots:
        parts.append(f"<img src='{plots['training']}' alt='training'>")
    concepts = metrics.get("concepts") or {}
    if concepts:
        parts.append(
            "<h2>Concept codes</h2><p>The best code (by F1) for each concept over the code cache.</p>"
        )
        rows = []
        for c in concepts.get("word_concepts", []):
            precise = c.get("precise") or {}
            rows.append(
                [
                    html.escape(c["name"]),
                    _fmt(c.get("labelled_tokens")),
                    _code(c),
                    _fmt(c.get("precision")),
                    _fmt(c.get("recall")),
                    _code(precise),
                    _fmt(precise.get("precision")) if precise else "",
                    _fmt(precise.get("recall")) if precise else "",
                ]
            )
        for topic, found in (concepts.get("topics") or {}).items():
            best = found.get("best_f1") or {}
            chosen = found.get("steering_codes") or []
            rows.append(
                [
                    f"topic: {html.escape(topic)}",
                    "",
                    _code(best),
                    _fmt(best.get("precision")),
                    _fmt(best.get("recall")),
                    f"{len(chosen)} steering codes",
                    _fmt(chosen[0]["precision"]) if chosen else "",
                    _fmt(chosen[0]["recall"]) if chosen else "",
                ]
            )
        parts.append(
            _table(
                [
                    "concept",
                    "labelled tokens",
                    "best code (F1)",
                    "precision",
                    "recall",
                    f"best code with precision &ge; {PRECISE} (F1)",
                    "precision",
                    "recall",
                ],
                rows,
            )
        )
        parts.append(
            f"<p>Topic codes in the reference's sense (firing on at least 20% of one article's tokens): "
            f"{_fmt(concepts.get('reference_topic_codes'))}.</p>"
        )
    steering = metrics.get("steering") or {}
    if steering:
        parts.append(
            "<h2>Steering</h2><p>A generation counts as steered when the topic classifier (TF-IDF + "
            f"logistic regression on the BBC train split; held-out accuracy {_fmt(steering.get('classifier_test_accuracy'))}) "
            "says it is on the target topic <i>and</i> it is fluent: distinct-bigram ratio &ge; 0.5 and the base model's "
            f"loss on it within 1.5x of the unsteered generations' ({_fmt(steering.get('reference_loss'))}). "
            "<i>topic word</i> is the reference's own measure (the topic's name appears).</p>"
        )
        rows = [
            [
                html.escape(c),
                _fmt(v.get("steered")),
                _fmt(v.get("on_topic")),
                _fmt(v.get("fluent")),
                _fmt(v.get("topic_word")),
            ]
            for c, v in steering.get("conditions", {}).items()
        ]
        parts.append(_table(["condition", "steered", "on topic", "fluent", "topic word"], rows))
        parts.append(_versus(steering.get("conditions", {})))
        if "steering" in plots:
            parts.append(f"<img src='{plots['steering']}' alt='steering'>")
        parts.append("<h3>Example generations</h3>")
        rows = []
        for condition, by_topic in (steering.get("samples") or {}).items():
            for topic, samples in by_topic.items():
                for s in samples[:EXAMPLES_PER_CELL]:
                    verdict = (
                        "steered"
                        if s.get("steered")
                        else f"predicted {s.get('predicted')}"
                        + ("" if s.get("fluent") else ", not fluent")
                    )
                    rows.append(
                        [
                            html.escape(condition),
                            html.escape(topic),
                            f"<span class='gen'><b>{html.escape(s['prompt'])}</b>{html.escape(s['text'])}</span>",
                            html.escape(verdict),
                        ]
                    )
        parts.append(_table(["condition", "target", "generation", "verdict"], rows))
    sae = metrics.get("sae") or {}
    if sae:
        parts.append(
            f"<h3>The SAE baseline</h3><p>A SAELens TopK SAE (d_sae {_fmt(sae.get('d_sae'))}, k "
            f"{_fmt(sae.get('k'))}) trained on the base model's activations at <code>{_fmt(sae.get('hook'))}</code> "
            f"(where most topic codes sit) over the {_fmt(sae.get('train_tokens'))} tokens the codebooks saw, "
            f"in {_fmt(sae.get('train_seconds'))} s. Each topic's most precise features are clamped to "
            "their mean active value at every position; only the change is added, so the SAE's "
            "reconstruction error stays in. Its generations run on the base model (codebooks bypassed).</p>"
        )
    analysis = metrics.get("analysis") or {}
    if analysis.get("dashboard"):
        link = html.escape(analysis["dashboard"], quote=True)
        parts.append(
            f"<h2>Code browser</h2><p><a href='{link}'><b>Open the code browser</b></a>: every codebook's codes "
            "over the held-out articles, with top contexts, logit effects, co-firing and precision/recall "
            "against the topics. The cache itself opens with <code>CodeCache.open('code_cache')</code>.</p>"
        )
    return "\n".join(parts)


def write_lm_report(out: str | Path, metrics: dict[str, Any]) -> Path:
    """Write `out/index.html` (and its plots) from `metrics`; returns the page's path."""
    out = Path(out)
    plots = _plots(out, metrics)
    return atomic_write_text(out / "index.html", _html(metrics, plots))


__all__ = ["TARGETS", "write_lm_report"]
