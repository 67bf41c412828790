"""The TokFSM run report: PNG plots and an `index.html` that explains them, drawn from `metrics.json`.

It reads only the run directory (metrics.json and the training phases' `metrics.jsonl` logs), so
it can be redrawn at any time (`write_report(dir)`), and it draws whatever the metrics hold: a run
killed half-way still gets a readable report. Every file is written atomically.
"""

from __future__ import annotations

import hashlib
import html
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tl_codebook.analysis.plots import (
    plot_code_label_heatmap,
    plot_grouped_bars,
    plot_precision_recall_bars,
    plot_training_curves,
)
from tl_codebook.files import atomic_write_json, atomic_write_text, json_text
from tl_codebook.fsm.metrics_file import CONTRACT_KEYS, read_metrics
from tl_codebook.training.metrics_log import read_metrics as read_training_log

TARGETS = {
    "base_transition_accuracy": 0.98,
    "codebook_transition_accuracy": 0.95,
    "states_with_precise_code": 0.8,
    "intervention_success": 0.8,
}
CONDITION_NAMES = {
    "none": "no intervention",
    "steer": "force s′'s codes (all codebooks, every digit position)",
    "steer_best_site": "best single codebook",
    "steer_last_position": "last prompt position only",
    "random_code": "random codes",
}
"""The steering conditions of `tl_codebook.fsm.steering.evaluate_interventions`, as the report
names them."""
INIT_WORDS = {
    "kmeans": "k-means centres of the base model's activations",
    "activations": "randomly chosen activations of the base model",
    "random": "random Gaussian vectors",
}
PLOT_CACHE = ".report-plots.json"
"""Digests of each plot's inputs, so an unchanged plot is not drawn again."""
REFERENCE_NOTE = "reference: 0.975 (paper's k=1 model, N=100/E=10)"


def steering_rows(interventions: dict[str, Any] | None) -> list[dict[str, Any]] | None:
    """The steering conditions as the code browser's table (None before they were measured):
    one row per condition, named as the report names it."""
    if not interventions:
        return None
    return [
        {
            "condition": CONDITION_NAMES[name],
            "success (next state follows s′)": interventions[name]["success"],
            "next state follows s": interventions[name]["follows_source"],
            **(
                {"JS divergence to s′'s next states (bits)": interventions[name]["js_divergence"]}
                if "js_divergence" in interventions[name]
                else {}
            ),
        }
        for name in CONDITION_NAMES
        if isinstance(interventions.get(name), dict)
    ]


def write_report(out_dir: str | Path) -> Path:
    """Draw the plots the metrics allow and (re)write `index.html`; returns its path.

    Works on a run at any stage: plots need only the metrics that exist so far (a run that
    stopped early gets a report of what it measured).

    Raises:
        ValueError: if `out_dir` holds no metrics.json, or an unreadable one.
    """
    out = Path(out_dir)
    metrics = read_metrics(out)
    plots = _draw_plots(out, metrics)
    return atomic_write_text(out / "index.html", _html(metrics, plots))


def _training_curves(
    out: Path, metrics: dict[str, Any]
) -> dict[str, tuple[list[int], list[float]]]:
    """phase -> (steps, losses) from each training phase's log (what it has logged so far)."""
    curves = {}
    for name, run in metrics.get("training", {}).items():
        log = out / run["log"] if isinstance(run, dict) and "log" in run else None
        records = read_training_log(log) if log is not None and log.is_file() else []
        points = [(r["step"], r["loss"]) for r in records if r.get("loss") is not None]
        if points:
            curves[name] = ([s for s, _ in points], [v for _, v in points])
    return curves


# -- plots -------------------------------------------------------------------------------------


class _Plots:
    """Draws each plot into the run directory unless the same plot of the same data is already
    there (`PLOT_CACHE` keeps a digest of each PNG's inputs): the report is redrawn after every
    phase, and a plot takes a good part of a second."""

    def __init__(self, out: Path):
        self.out = out
        try:
            cached = json.loads((out / PLOT_CACHE).read_text())
        except (OSError, ValueError):
            cached = {}
        self.cache: dict[str, str] = cached if isinstance(cached, dict) else {}
        self.files: dict[str, str] = {}

    def draw(
        self, name: str, file: str, plot: Callable[..., Path], *args: Any, **kwargs: Any
    ) -> None:
        digest = hashlib.sha256(
            json_text([plot.__name__, args, kwargs], indent=None).encode()
        ).hexdigest()
        if self.cache.get(file) != digest or not (self.out / file).is_file():
            plot(*args, path=self.out / file, **kwargs)
            self.cache[file] = digest
            atomic_write_json(self.out / PLOT_CACHE, self.cache)
        self.files[name] = file


def _draw_plots(out: Path, metrics: dict[str, Any]) -> dict[str, str]:
    """name -> file name of every plot the metrics allow."""
    plots = _Plots(out)
    curves = _training_curves(out, metrics)
    if curves:
        base_steps = metrics.get("config", {}).get("base_steps", 0)
        reference, zoom = {}, None
        floor = metrics.get("loss_floor")
        if floor is not None:
            reference["task entropy (best possible loss)"] = floor
            zoom = (floor - 0.02, floor + 0.2)
        label = {k: f"{k} model" if k in ("base", "codebook") else k for k in curves}
        plots.draw(
            "training",
            "training_curves.png",
            plot_training_curves,
            {label[k]: losses for k, (_, losses) in curves.items()},
            title="Training loss (codebook model: fine-tuned from the base)",
            reference=reference,
            offsets={label["codebook"]: base_steps} if "codebook" in curves else None,
            zoom=zoom,
            steps={label[k]: steps for k, (steps, _) in curves.items()},
        )
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
        plots.draw(
            "accuracy",
            "accuracy.png",
            plot_grouped_bars,
            groups,
            title="How well each model follows the FSM",
        )
    codes = metrics.get("state_codes")
    if codes:
        best = codes["best_per_state"]
        plots.draw(
            "state_codes",
            "state_codes.png",
            plot_precision_recall_bars,
            [f"{r['state']}" for r in best],
            [r["precision"] for r in best],
            [r["recall"] for r in best],
            threshold=codes["threshold"],
            title="Each state's best code (over all codebooks): precision and recall",
            xlabel="state",
        )
        plots.draw(
            "per_site",
            "state_codes_per_site.png",
            plot_grouped_bars,
            {
                "L" + site.removeprefix("blocks.").replace("hook_", ""): {
                    "states with a precise code": v["states_with_precise_code"],
                    "mean best F1": v["mean_best_f1"],
                }
                for site, v in codes["per_site"].items()
            },
            title="State codes per codebook",
        )
        heat = codes.get("heatmap")
        if heat and heat["precision"]:
            n_states = len(heat["precision"][0])
            plots.draw(
                "heatmap",
                "code_state_heatmap.png",
                plot_code_label_heatmap,
                heat["precision"],
                row_labels=heat["codes"],
                col_labels=[str(s) for s in range(n_states)],
                title=f"P(state | code) at {heat['site']}",
                xlabel="current state",
                ylabel="code (each state's best code)",
            )
    interventions = metrics.get("interventions")
    if interventions:
        plots.draw(
            "interventions",
            "interventions.png",
            plot_grouped_bars,
            {
                CONDITION_NAMES.get(c, c).replace(" ", "\n", 1): {
                    "next state follows s′ (success)": interventions[c]["success"],
                    "next state follows s": interventions[c]["follows_source"],
                }
                for c in CONDITION_NAMES
                if c in interventions
            },
            title="Steering a model in state s towards state s′",
        )
    return plots.files


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


def _browser_section(analysis: Any) -> str:
    """The link to the code browser and what it holds (once phase 5 has written it)."""
    if not isinstance(analysis, dict) or "dashboard" not in analysis:
        return "<p class='pending'>(not written yet)</p>"
    link = html.escape(str(analysis["dashboard"]), quote=True)
    return (
        f"<p><a href='{link}'><b>Open the code browser</b></a> (a static site in "
        f"<code>{html.escape(str(Path(analysis['dashboard']).parent))}/</code>, opens from disk, "
        "no server): every codebook's code usage, search by token, regex or code id, and per "
        "code its top contexts, firing density, logit effects, co-firing codes and precision and "
        "recall against the FSM states, plus the steering results above. It reads the code cache "
        f"<code>{html.escape(str(analysis.get('cache')))}/</code>: the code ids of every codebook "
        f"over the {_fmt(analysis.get('n_tokens'))} held-out tokens "
        f"({_fmt(analysis.get('cache_bytes'))} bytes; the site {_fmt(analysis.get('site_bytes'))} "
        f"bytes in {_fmt(analysis.get('site_files'))} files). Query it from Python with "
        "<code>tl_codebook.analysis.CodeCache.open(dir)</code> or with "
        "<code>tl-codebook search</code>.</p>"
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
        ("base", "first_transition_accuracy_exact", REFERENCE_NOTE),
        ("codebook", "first_transition_accuracy_exact", REFERENCE_NOTE),
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
    for condition in ("steer", "random_code", "none"):
        result = (metrics.get("interventions") or {}).get(condition) or {}
        if "js_divergence" in result:
            rows.append(
                f"<tr><td><code>interventions.{condition}.js_divergence</code></td>"
                f"<td>{_fmt(result['js_divergence'])}</td><td>the reference's measure, bits "
                "(lower is better)</td></tr>"
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
{_figure(plots, "training", "Next-token loss during training. The base model learns the FSM; the codebook model starts from the base model's weights with codebooks inserted (their codes initialised as " + INIT_WORDS.get(cfg.get("codebook_init", ""), "configured") + ") and is fine-tuned jointly. The dashed line is the task's entropy: no model can do better.")}
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
on s′'s codes: in each codebook slot (a codebook group: one per attention head, one per MLP;
{slots} slots on average) the code with the best F1 for s′. The model re-reads the
current state at each digit it writes, so the codes are forced at every position until the next
state is written (at the second digit, the codes for "s′ followed by the digit just written").
<b>Success</b> means the next state the model generates is a valid successor of s′.
The conditions: <b>force s′'s codes</b> (<code>steer</code>, the headline
<code>intervention_success</code>: all slots, every digit position); <b>best single
codebook</b> (<code>steer_best_site</code>: only the one slot whose code has the highest F1, every
digit position); <b>last prompt position only</b> (<code>steer_last_position</code>: all slots,
only at the prompt's last token); <b>random codes</b> (<code>random_code</code>: in the same slots
and positions as <code>steer</code>, a code drawn uniformly from that codebook's other codes);
<b>no intervention</b> (<code>none</code>).
The reference's own measure needs no sampling: for each prompt, the exact probability of every
next state under the condition (the product of its digits' probabilities), compared with s′'s
true next states (uniform over its out-edges) by the Jensen-Shannon divergence, in bits (0: the
model continues exactly as the machine does from s′; 1: never a successor of s′). Its mean per
condition is <code>js_divergence</code> in the code browser's steering table.</p>
{_figure(plots, "interventions", "Fraction of generated next states that follow s′ (success) or the true current state s. The two overlap when s and s′ share successors (on average " + _fmt(interventions.get("chance_overlap")) + " of the successors).")}

<h3>4. Browse the codes</h3>
{_browser_section(metrics.get("analysis"))}

<details><summary>Configuration</summary><table>{config_rows}</table></details>
<p>Files: <code>metrics.json</code> (all numbers), <code>fsm.json</code> (the machine),
<code>base_model/</code> and <code>codebook_model/</code> (weights, safetensors; load both
models with <code>fsm, base, model = tl_codebook.fsm.models.load_run(dir)</code>);
<code>training/base/</code> and <code>training/codebook/</code> (each phase's training log
<code>metrics.jsonl</code> and checkpoints, from which <code>tl-codebook demo --resume</code>
continues a stopped run).</p>
</body></html>
"""
