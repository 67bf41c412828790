"""The TokFSM run report: PNG plots and an `index.html` that explains them, drawn from `metrics.json`.

It reads only the run directory, so it can be redrawn at any time (`write_report(dir)`), and it
draws whatever the metrics hold: a run killed half-way still gets a readable report.
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import Any

from tl_codebook.analysis.plots import (
    plot_code_label_heatmap,
    plot_grouped_bars,
    plot_precision_recall_bars,
    plot_training_curves,
)

CONTRACT_KEYS = (
    "base_transition_accuracy",
    "codebook_transition_accuracy",
    "states_with_precise_code",
    "intervention_success",
    "intervention_success_random_code",
)
TARGETS = {
    "base_transition_accuracy": 0.98,
    "codebook_transition_accuracy": 0.95,
    "states_with_precise_code": 0.8,
    "intervention_success": 0.8,
}
CONDITION_NAMES = {
    "none": "no intervention",
    "steer": "force s′'s codes",
    "steer_best_site": "best single codebook",
    "steer_last_position": "last prompt position only",
    "random_code": "random codes",
}


def write_report(out_dir: str | Path) -> Path:
    """Draw the plots the metrics allow and (re)write `index.html`; returns its path."""
    out = Path(out_dir)
    metrics = json.loads((out / "metrics.json").read_text())
    plots = _draw_plots(out, metrics)
    page = out / "index.html"
    tmp = page.with_suffix(".html.tmp")
    tmp.write_text(_html(metrics, plots))
    tmp.replace(page)
    return page


# -- plots -------------------------------------------------------------------------------------


def _draw_plots(out: Path, metrics: dict[str, Any]) -> dict[str, str]:
    """name -> file name of every plot the metrics allow."""
    plots: dict[str, str] = {}
    training = metrics.get("training", {})
    curves = {name: run["loss"] for name, run in training.items() if run.get("loss")}
    if curves:
        offsets = {"codebook": len(training.get("base", {}).get("loss", []))}
        reference, zoom = {}, None
        floor = metrics.get("loss_floor")
        if floor is not None:
            reference["task entropy (best possible loss)"] = floor
            zoom = (floor - 0.02, floor + 0.2)
        plot_training_curves(
            {f"{k} model" if k in ("base", "codebook") else k: v for k, v in curves.items()},
            out / "training_curves.png",
            title="Training loss (codebook model: fine-tuned from the base)",
            reference=reference,
            offsets={f"{k} model": v for k, v in offsets.items()},
            zoom=zoom,
        )
        plots["training"] = "training_curves.png"
    evaluated = {
        label: metrics[key]
        for key, label in (("base", "base model"), ("codebook", "codebook model"))
        if isinstance(metrics.get(key), dict)
    }
    if evaluated:
        groups = {
            "transition accuracy\n(sampled)": {
                m: r.get("transition_accuracy", 0.0) for m, r in evaluated.items()
            },
            "first-transition accuracy\n(exact, reference's metric)": {
                m: r.get("first_transition_accuracy_exact", 0.0) for m, r in evaluated.items()
            },
        }
        plot_grouped_bars(groups, out / "accuracy.png", title="How well each model follows the FSM")
        plots["accuracy"] = "accuracy.png"
    codes = metrics.get("state_codes")
    if codes:
        best = codes["best_per_state"]
        plot_precision_recall_bars(
            [f"{r['state']}" for r in best],
            [r["precision"] for r in best],
            [r["recall"] for r in best],
            out / "state_codes.png",
            threshold=codes["threshold"],
            title="Each state's best code (over all codebooks): precision and recall",
            xlabel="state",
        )
        plots["state_codes"] = "state_codes.png"
        plot_grouped_bars(
            {
                "L" + site.removeprefix("blocks.").replace("hook_", ""): {
                    "states with a precise code": v["states_with_precise_code"],
                    "mean best F1": v["mean_best_f1"],
                }
                for site, v in codes["per_site"].items()
            },
            out / "state_codes_per_site.png",
            title="State codes per codebook",
        )
        plots["per_site"] = "state_codes_per_site.png"
        heat = codes.get("heatmap")
        if heat and heat["precision"]:
            n_states = len(heat["precision"][0])
            plot_code_label_heatmap(
                heat["precision"],
                out / "code_state_heatmap.png",
                row_labels=heat["codes"],
                col_labels=[str(s) for s in range(n_states)],
                title=f"P(state | code) at {heat['site']}",
                xlabel="current state",
                ylabel="code (each state's best code)",
            )
            plots["heatmap"] = "code_state_heatmap.png"
    interventions = metrics.get("interventions")
    if interventions:
        plot_grouped_bars(
            {
                CONDITION_NAMES.get(c, c).replace(" ", "\n", 1): {
                    "next state follows s′ (success)": interventions[c]["success"],
                    "next state follows s": interventions[c]["follows_source"],
                }
                for c in CONDITION_NAMES
                if c in interventions
            },
            out / "interventions.png",
            title="Steering a model in state s towards state s′",
        )
        plots["interventions"] = "interventions.png"
    return plots


# -- html --------------------------------------------------------------------------------------


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "n/a" if not math.isfinite(value) else f"{value:.3f}"
    if value is None:
        return "not yet measured"
    return html.escape(str(value))


def _figure(plots: dict[str, str], name: str, caption: str) -> str:
    if name not in plots:
        return "<p class='pending'>(not measured yet)</p>"
    return (
        f"<figure><img src='{plots[name]}' alt='{html.escape(name)}'>"
        f"<figcaption>{caption}</figcaption></figure>"
    )


def _html(metrics: dict[str, Any], plots: dict[str, str]) -> str:
    cfg = metrics.get("config", {})
    status = metrics.get("status", "unknown")
    rows = []
    for key in CONTRACT_KEYS:
        target = TARGETS.get(key)
        value = metrics.get(key)
        mark = ""
        if target is not None and isinstance(value, (int, float)):
            mark = " ✓" if value >= target else " ✗"
        rows.append(
            f"<tr><td><code>{key}</code></td><td>{_fmt(value)}{mark}</td>"
            f"<td>{'≥ ' + str(target) if target is not None else ''}</td></tr>"
        )
    extra = [
        ("base", "first_transition_accuracy_exact", "reference's k=1 model: 0.975"),
        ("codebook", "first_transition_accuracy_exact", "reference's k=1 model: 0.975"),
        ("base", "next_token_loss", "held-out"),
        ("codebook", "next_token_loss_before_fine_tuning", "codebooks just inserted"),
        ("codebook", "next_token_loss", "held-out"),
    ]
    for key, name, note in extra:
        result = metrics.get(key) or {}
        rows.append(
            f"<tr><td><code>{key}.{name}</code></td><td>{_fmt(result.get(name))}</td>"
            f"<td>{note}</td></tr>"
        )
    rows.append(
        f"<tr><td><code>loss_floor</code></td><td>{_fmt(metrics.get('loss_floor'))}</td>"
        "<td>the task's entropy: the best possible loss</td></tr>"
    )
    phases = metrics.get("phases", {})
    phase_text = ", ".join(f"{k} {v:.0f}s" for k, v in phases.items()) or "none yet"
    config_rows = "".join(
        f"<tr><td><code>{html.escape(str(k))}</code></td><td>{_fmt(v)}</td></tr>"
        for k, v in cfg.items()
    )
    d = metrics.get("digits_per_state", "?")
    interventions = metrics.get("interventions", {})
    n_prompts = interventions.get("n_prompts", "?")
    samples = cfg.get("n_samples", "?")
    slots_forced = interventions.get("mean_slots_forced")
    slots = f"{slots_forced:g}" if isinstance(slots_forced, (int, float)) else "used"
    banner = (
        ""
        if status == "done"
        else f"<p class='warn'>This run has not finished (status: <b>{html.escape(status)}</b>)."
        " The report shows the phases finished so far; it is redrawn after each phase, so if "
        "the run was stopped, this is what it had done.</p>"
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>TokFSM codebook features</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 980px; margin: 2em auto; padding: 0 1em;
       line-height: 1.5; color: #222; }}
table {{ border-collapse: collapse; margin: 0.5em 0 1em; }}
td, th {{ border: 1px solid #ccc; padding: 0.2em 0.6em; text-align: left; }}
figure {{ margin: 1em 0; }} img {{ max-width: 100%; border: 1px solid #eee; }}
figcaption {{ color: #555; font-size: 0.92em; }}
.warn {{ background: #fff3cd; padding: 0.5em; }} .pending {{ color: #888; }}
details {{ margin: 1em 0; }}
</style></head><body>
<h1>Codebook features on a finite state machine (TokFSM)</h1>
{banner}
<p>This page reproduces, at small scale, the TokFSM experiment of <i>Codebook Features: Sparse and
Discrete Interpretability for Neural Networks</i> (Tamkin, Taufeeque &amp; Goodman, 2023).</p>

<h2>The idea in short</h2>
<p>A random <b>finite state machine</b> with {cfg.get("n_states", "N")} states, each with
{cfg.get("n_edges", "E")} possible next states, generates random walks. Each state is written as
{d} base-{cfg.get("base", "b")} digits, so a sequence looks like <code>BOS 0 7 2 3 1 9 …</code>
(states 07, 23, 19, …). A small transformer is trained to predict the next digit: to do that it
must know which state it is in. We then insert <b>codebooks</b> into it: after every attention
head and every MLP, the activation is replaced by the closest of a small set of learned vectors
(the <i>codes</i>; here one code at a time, k={cfg.get("k", 1)}). The model is fine-tuned with
the codebooks in place. Because each codebook now passes on a single discrete code, we can ask
which code means "the machine is in state s", and we can <b>steer</b> the model by switching codes
on by hand.</p>

<h2>Results</h2>
<table><tr><th>metric</th><th>value</th><th>target / note</th></tr>{"".join(rows)}</table>
<p>Run status: <b>{html.escape(status)}</b>; time per phase: {phase_text}; total
{_fmt(metrics.get("seconds"))} s.</p>

<h3>1. Training</h3>
{_figure(plots, "training", "Next-token loss during training. The base model learns the FSM; the codebook model starts from the base model's weights with codebooks inserted (initialised by k-means on the base model's activations) and is fine-tuned jointly. The dashed line is the task's entropy: no model can do better.")}
{_figure(plots, "accuracy", f"Transition accuracy: the fraction of state-to-state steps in {samples} sampled continuations (temperature 1) that the FSM allows. First-transition accuracy (exact) is the reference implementation's measure: for each state, the overlap of the model's {cfg.get('n_edges', 'E')} most likely next states with the true ones.")}

<h3>2. Which code means "the machine is in state s"?</h3>
<p>On held-out sequences, at every position where a state's last digit has just been read,
we record every codebook's code. For every code and state, <b>precision</b> = P(state is s | code
is on) and <b>recall</b> = P(code is on | state is s). A code with both near 1 is a
"state code": it fires exactly when the machine is in that state.
<code>states_with_precise_code</code> is the fraction of states that have a code with precision
and recall ≥ {_fmt(metrics.get("state_codes", {}).get("threshold", 0.9))} in some codebook.</p>
{_figure(plots, "state_codes", "For each state, its best code over all codebooks (the one with the highest min(precision, recall)): precision and recall. Bars above the dashed line on both counts make a precise state code.")}
{_figure(plots, "per_site", "Per codebook: the fraction of states with a precise code there, and the mean F1 of each state's best code.")}
{_figure(plots, "heatmap", "Each row is one state's best code in the codebook with the most state codes; each column a state. A bright diagonal means each code stands for one state.")}

<h3>3. Steering the model through its codes</h3>
<p>We take {n_prompts} prompts that end in a state s, pick another state s′ at random and switch
on s′'s codes (in each of the {slots} codebooks — every attention head and MLP — the code
that best indicates s′). The model re-reads the
current state at each digit it writes, so the codes are forced at every position until the next
state is written (at the second digit, the codes for "s′ followed by the digit just written").
<b>Success</b> means the next state the model generates is a valid successor of s′. Baselines:
no intervention, and random codes in the same places. Also shown: forcing only the single best
codebook, and forcing only at the prompt's last position.</p>
{_figure(plots, "interventions", "Fraction of generated next states that follow s′ (success) or the true current state s. The two overlap when s and s′ share successors (on average " + _fmt(interventions.get("chance_overlap")) + " of the successors).")}

<details><summary>Configuration</summary><table>{config_rows}</table></details>
<p>Files: <code>metrics.json</code> (all numbers), <code>fsm.json</code> (the machine),
<code>base_model/</code> and <code>codebook_model/</code> (weights, safetensors; load the codebook
model with <code>HookedCodebookTransformer(cfg).load_codebooks(dir)</code>).</p>
</body></html>
"""
