"""Codebooks vs SAEs side by side: train every method on one activation store, score them alike.
`run(store, methods, config)` returns a `ComparisonResult` (rows, markdown, CSV, JSON, plots).

In a notebook:

    store = ActivationStore.build(model, tokens, ["blocks.0.hook_resid_post"], "cache/train")
    held_out = ActivationStore.build(model, eval_tokens, ["blocks.0.hook_resid_post"], "cache/eval")
    config = ComparisonConfig(training=TrainingConfig("blocks.0.hook_resid_post", d_sae=128, k=1))
    result = run(store, ["codebook", "topk", my_trained_sae], config, model=model,
                 eval_store=held_out)
    result.rows ; print(result.to_markdown()) ; result.to_csv("cmp.csv") ; result.plot()

Methods given as specs (`MethodSpec`, or a kind name like "topk") are trained on `store` with the
same budget; trained objects (a `Codebook`, a SAELens SAE, anything with encode/decode) are only
evaluated. Every method is evaluated by `metrics.evaluate_method` on `eval_store`. The concept
and steering metrics come from a `tl_codebook.tasks.Task` (`run(..., task=...)`, or the task a
store's metadata names under "task"); the comparison never depends on which task it is.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tl_codebook.comparisons.methods import (
    CODEBOOK_KINDS,
    MethodSpec,
    TrainedMethod,
    TrainingConfig,
    as_method,
    train_method,
)
from tl_codebook.comparisons.metrics import (
    EvalConfig,
    evaluate_method,
    evaluated_tokens,
    splice_baseline,
)
from tl_codebook.comparisons.store import ActivationStore
from tl_codebook.configs import dataclass_from_dict
from tl_codebook.files import atomic_write_text, json_ready, json_text
from tl_codebook.tasks import Task, task_from_dict

CONTRACT_COLUMNS = (
    "method",
    "l0",
    "mse",
    "fve",
    "ce_loss_recovered",
    "kl",
    "dead_fraction",
    "tokens_per_second",
    "states_with_precise_latent",
    "steering_success",
)
"""Columns every row of comparison.json has (NaN/null where a metric does not apply); `fve`,
`ce_loss_recovered`, `kl` and `states_with_precise_latent` are aliases of `explained_variance`,
`ce_loss_score`, `kl_div_with_sae` and `concepts_with_precise_latent` (see `metrics`)."""

SUMMARY_COLUMNS = (
    "method",
    "l0",
    "mse",
    "explained_variance",
    "ce_loss_score",
    "kl_div_with_sae",
    "dead_fraction",
    "concepts_with_precise_latent",
    "steering_success",
    "steering_baseline",
    "train_tokens",
    "train_seconds",
    "tokens_per_second",
)

DEFAULT_METHODS = ("codebook", "codebook_saelens", "topk", "batchtopk")


@dataclass
class ComparisonConfig:
    """One config for the whole comparison: the matched training budget and the evaluation.

    Its parts may be given as dicts (as `to_dict` writes them); each is built and checked.

    Raises:
        ValueError: on construction, for a part that its own class refuses.
    """

    training: TrainingConfig
    """The matched budget every trained method gets."""
    evaluation: EvalConfig = field(default_factory=EvalConfig)
    """How every method is scored."""
    methods: list[MethodSpec] = field(
        default_factory=lambda: [MethodSpec(kind) for kind in DEFAULT_METHODS]
    )
    """The methods to train (default: codebook, codebook_saelens, topk, batchtopk)."""

    def __post_init__(self) -> None:
        if isinstance(self.training, dict):
            self.training = TrainingConfig.from_dict(self.training)
        if isinstance(self.evaluation, dict):
            self.evaluation = EvalConfig.from_dict(self.evaluation)
        self.methods = [
            m if isinstance(m, MethodSpec) else MethodSpec.from_dict(m) for m in self.methods
        ]

    def to_dict(self) -> dict[str, Any]:
        """The config as a JSON-ready dict of its three parts (the inverse of `from_dict`)."""
        return {
            "training": self.training.to_dict(),
            "evaluation": self.evaluation.to_dict(),
            "methods": [m.to_dict() for m in self.methods],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ComparisonConfig:
        """The config a dict from `to_dict` describes.

        Raises:
            ValueError: for an unknown or missing key, or a part its class refuses.
        """
        return dataclass_from_dict(cls, data)


def _format(value: Any) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if isinstance(value, float):
        if value == 0:
            return "0"
        if abs(value) >= 1e5 or abs(value) < 1e-3:
            return f"{value:.3g}"
        return f"{value:.4g}"
    return str(value)


@dataclass
class ComparisonResult:
    """The comparison's outcome: one row per method, per-method details, and provenance."""

    rows: list[dict[str, Any]]
    """One dict of scores per method (`CONTRACT_COLUMNS` and more), NaN where not computed."""
    details: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per method: latent densities and their histogram, mean active values, per-state scores."""
    agreement: list[dict[str, Any]] = field(default_factory=list)
    """Per codebook trained both ways: how far our trainer and SAELens' trainer agree."""
    config: dict[str, Any] = field(default_factory=dict)
    """The ComparisonConfig, the stores and the model, as a dict."""
    methods: dict[str, TrainedMethod] = field(default_factory=dict, repr=False)
    """The trained methods (not saved by `to_json`; `save` writes their weights)."""

    def row(self, method: str) -> dict[str, Any]:
        """The row of the method named `method`.

        Raises:
            KeyError: for a name no row has (the message lists the methods).
        """
        for row in self.rows:
            if row["method"] == method:
                return row
        raise KeyError(
            f"No method {method!r}; methods: {', '.join(r['method'] for r in self.rows)}."
        )

    @property
    def columns(self) -> list[str]:
        """Every scalar column, in first-seen order."""
        seen: dict[str, None] = {}
        for row in self.rows:
            for key, value in row.items():
                if not isinstance(value, (dict, list)):
                    seen.setdefault(key, None)
        return list(seen)

    def matched_budget(self) -> bool:
        """True when every trained method saw the same number of training tokens."""
        trained = {row["train_tokens"] for row in self.rows if row.get("train_tokens")}
        return len(trained) <= 1

    def to_markdown(self, columns: Sequence[str] | None = None) -> str:
        """A markdown table (default: every column)."""
        columns = list(columns or self.columns)
        lines = [
            "| " + " | ".join(columns) + " |",
            "|"
            + "|".join("---" if c in ("method", "kind", "hook_name") else "---:" for c in columns)
            + "|",
        ]
        for row in self.rows:
            lines.append("| " + " | ".join(_format(row.get(c)) for c in columns) + " |")
        return "\n".join(lines) + "\n"

    def to_csv(self, path: str | Path | None = None) -> str:
        """The rows as CSV (every scalar column); written to `path` when given. Returns the text."""
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=self.columns, extrasaction="ignore")
        writer.writeheader()
        for row in self.rows:
            writer.writerow({k: ("" if json_ready(v) is None else v) for k, v in row.items()})
        if path is not None:
            atomic_write_text(path, buffer.getvalue())
        return buffer.getvalue()

    def to_json(self, path: str | Path | None = None) -> str:
        """The rows as a JSON list (the comparison.json contract); NaN written as null."""
        text = json_text(self.rows)
        if path is not None:
            atomic_write_text(path, text + "\n")
        return text

    def plot(self) -> Any:
        """One matplotlib Figure: FVE and CE recovered against L0, densities, per-state P/R."""
        from tl_codebook.comparisons.report import summary_figure

        return summary_figure(self)

    def save(self, out_dir: str | Path) -> Path:
        """Write the report directory (CSV, JSON, markdown, plots, index.html); see `report`.

        Returns:
            The report directory.
        """
        from tl_codebook.comparisons.report import write_report

        return write_report(self, out_dir)

    @classmethod
    def load(cls, out_dir: str | Path) -> ComparisonResult:
        """Read a report directory written by `save` (without the trained methods).

        Nulls in comparison.json come back as NaN.

        Raises:
            FileNotFoundError: if `out_dir` has no comparison.json.
            json.JSONDecodeError: (a ValueError) for a file that is not valid JSON.
        """
        out = Path(out_dir)
        rows = json.loads((out / "comparison.json").read_text())
        extra = out / "details.json"
        details, agreement, config = {}, [], {}
        if extra.is_file():
            data = json.loads(extra.read_text())
            details = data.get("methods", {})
            agreement = data.get("agreement", [])
            config = data.get("config", {})
        nan_rows = [{k: (math.nan if v is None else v) for k, v in r.items()} for r in rows]
        return cls(rows=nan_rows, details=details, agreement=agreement, config=config)


# -- running ---------------------------------------------------------------------------------------


def task_of(store: ActivationStore) -> Task | None:
    """The task a store's metadata names under "task" (None when it names none)."""
    data = store.manifest.metadata.get("task")
    return task_from_dict(data) if data else None


def default_config(store: ActivationStore, **training: Any) -> ComparisonConfig:
    """A ComparisonConfig for a store with a single hook (else name the hook yourself)."""
    if "hook_name" not in training:
        if len(store.hooks) != 1:
            raise ValueError(
                f"The store holds several hooks ({', '.join(store.hooks)}); give "
                "TrainingConfig(hook_name=...) to say which one to compare on."
            )
        training["hook_name"] = store.hooks[0]
    return ComparisonConfig(training=TrainingConfig(**training))


@torch.no_grad()
def codebook_agreement(
    a: TrainedMethod,
    b: TrainedMethod,
    store: ActivationStore,
    hook_name: str,
    exclude_token_ids: Sequence[int] = (),
    max_sequences: int | None = None,
) -> dict[str, float]:
    """How alike two codebooks are: the fraction of tokens given the same codes, and the largest
    difference between their code vectors relative to the largest code norm."""
    if a.codebook is None or b.codebook is None:
        raise ValueError(f"{a.name!r} and {b.name!r} must both be codebooks.")
    same, total = 0, 0
    for tokens, acts in store.iter_sequences(hook_name, 256, max_sequences):
        keep = evaluated_tokens(tokens, exclude_token_ids)
        x = acts[keep]
        ids_a = a.codebook.encode(x.to(a.codebook.codes.device)).sort(-1).values.cpu()
        ids_b = b.codebook.encode(x.to(b.codebook.codes.device)).sort(-1).values.cpu()
        same += int((ids_a == ids_b).all(-1).all(-1).sum())
        total += x.shape[0]
    codes_a, codes_b = a.codebook.codes.detach().cpu(), b.codebook.codes.detach().cpu()
    scale = codes_a.norm(dim=-1).max().clamp(min=1e-12)
    return {
        "same_codes_fraction": same / max(total, 1),
        "max_code_difference": float((codes_a - codes_b).norm(dim=-1).max() / scale),
    }


def run(
    store: ActivationStore,
    methods: Sequence[Any] | None = None,
    config: ComparisonConfig | None = None,
    model: Any = None,
    eval_store: ActivationStore | None = None,
    task: Task | None = None,
    out_dir: str | Path | None = None,
) -> ComparisonResult:
    """Train (specs) and evaluate (everything) `methods` on `store`; see the module docstring.

    `methods` items are `MethodSpec`s, kind names (`"topk"`, `"codebook:k=4"`), or trained
    objects; None uses `config.methods`. Every spec is checked (sizes, names) before any method
    trains. `eval_store` (default: `store`) should hold held-out tokens of the same model and
    hook. `task` (default: the one the evaluation store's metadata names) enables the concept
    and steering metrics. With `out_dir` the trained methods are saved under
    `out_dir/methods/` and the report is written there.

    Args:
        store: the training activations.
        methods: what to compare (default: `config.methods`).
        config: training budget, evaluation and methods (default: `default_config(store)`).
        model: the model the stores were built from, for the CE/KL and steering metrics.
        eval_store: held-out activations to score on (default: `store`).
        task: concept labels and the steering measure.
        out_dir: where to save the methods and the report; None saves nothing.

    Returns:
        The `ComparisonResult`, with the trained methods in `methods`.

    Raises:
        StoreError: for a store without the hook, or built from another model than `model`.
        ValueError: for stores built from different models or of different widths, no
            methods, a method spec that cannot be read or does not fit (`MethodSpec.resolved`),
            a trained method of another width, or two methods with one name; and what
            `train_method` and `evaluate_method` raise.
        TypeError: for a method object `as_method` cannot wrap.
    """
    config = config or default_config(store)
    training, evaluation = config.training, config.evaluation
    hook = training.hook_name
    eval_store = eval_store or store
    for s in (store, eval_store):
        s.check_compatible(model=model, hooks=[hook])
    if store is not eval_store and (
        store.manifest.model_fingerprint != eval_store.manifest.model_fingerprint
    ):
        raise ValueError(
            f"The training store ({store.path}) and the evaluation store ({eval_store.path}) were "
            "built from different models."
        )
    d_in = store.d_in(hook)
    if eval_store.d_in(hook) != d_in:
        raise ValueError(
            f"The evaluation store's activations at {hook!r} have width {eval_store.d_in(hook)}, "
            f"the training store's {d_in}."
        )
    task = task or task_of(eval_store)
    if training.exclude_token_ids is None:  # the task's exclusions (BOS), or none
        training = dataclasses.replace(
            training, exclude_token_ids=list(task.exclude_token_ids) if task else []
        )
        config = dataclasses.replace(config, training=training)
    items = list(config.methods if methods is None else methods)
    if not items:
        raise ValueError("No methods to compare: give at least one.")
    out = Path(out_dir) if out_dir is not None else None
    # every spec resolved and checked, and every name known, before anything trains
    prepared: list[MethodSpec | TrainedMethod] = []
    for item in items:
        if isinstance(item, str):
            item = MethodSpec.parse(item)
        ready = item.resolved(training, d_in) if isinstance(item, MethodSpec) else as_method(item)
        if isinstance(ready, TrainedMethod):
            _check_width(ready, d_in, hook)
        prepared.append(ready)
    names = [p.name for p in prepared]
    repeated = sorted({n for n in names if names.count(n) > 1 and n is not None})
    if repeated:
        raise ValueError(f"Two methods are named {repeated[0]!r}; give them distinct names.")

    trained: dict[str, TrainedMethod] = {}
    for item in prepared:
        if isinstance(item, MethodSpec):
            assert item.name is not None
            save_dir = out / "methods" / item.name if out is not None else None
            method = train_method(item, store, training, save_dir=save_dir)
        else:
            method = item
        _check_width(method, d_in, hook)
        trained[method.name] = method

    baseline = None
    if model is not None:
        tokens = eval_store.tokens()
        if evaluation.max_sequences is not None:
            tokens = tokens[: evaluation.max_sequences]
        baseline = splice_baseline(
            model, tokens, hook, training.excluded, evaluation.batch_sequences
        )
    rows, details = [], {}
    for name, method in trained.items():
        evaluation_of = evaluate_method(
            method,
            eval_store,
            hook,
            model=model,
            task=task,
            exclude_token_ids=training.excluded,
            config=evaluation,
            baseline=baseline,
        )
        rows.append(evaluation_of.row)
        details[name] = evaluation_of.details

    agreement: list[dict[str, Any]] = []
    ours = [m for m in trained.values() if m.kind == "codebook" and m.spec is not None]
    theirs = [m for m in trained.values() if m.kind == "codebook_saelens"]
    for a in ours:
        for b in theirs:
            if a.spec is not None and b.spec is not None and _same_codebook_spec(a.spec, b.spec):
                record: dict[str, Any] = {"ours": a.name, "saelens": b.name}
                record.update(
                    codebook_agreement(
                        a, b, eval_store, hook, training.excluded, evaluation.max_sequences
                    )
                )
                ra, rb = (
                    next(r for r in rows if r["method"] == a.name),
                    next(r for r in rows if r["method"] == b.name),
                )
                for key in ("explained_variance", "ce_loss_score", "concepts_with_precise_latent"):
                    record[f"{key}_difference"] = ra[key] - rb[key]
                agreement.append(record)

    result = ComparisonResult(
        rows=rows,
        details=details,
        agreement=agreement,
        config={
            **config.to_dict(),
            "store": str(store.path),
            "eval_store": str(eval_store.path),
            "model_name": store.manifest.model_name,
            "model_fingerprint": store.manifest.model_fingerprint,
            "store_tokens": store.n_tokens,
            "eval_store_tokens": eval_store.n_tokens,
            "ce_baseline": "zero ablation at every position (SAELens' ce_loss_score)",
            "task": task.to_dict() if task is not None else None,
        },
        methods=trained,
    )
    if out is not None:
        result.save(out)
    return result


def _check_width(method: TrainedMethod, d_in: int, hook: str) -> None:
    if method.d_in != d_in:
        raise ValueError(
            f"Method {method.name!r} has d_in={method.d_in}, but the store's activations at "
            f"{hook!r} have width {d_in}."
        )


def _same_codebook_spec(a: MethodSpec, b: MethodSpec) -> bool:
    keys = ("d_sae", "k", "lr", "similarity", "n_groups", "codebook_init")
    return all(getattr(a, key) == getattr(b, key) for key in keys) and {a.kind, b.kind} <= set(
        CODEBOOK_KINDS
    )


__all__ = [
    "CONTRACT_COLUMNS",
    "ComparisonConfig",
    "ComparisonResult",
    "codebook_agreement",
    "default_config",
    "run",
    "task_of",
]
