"""Generic plots for codebook experiments: training curves, a code x label heat map, per-label
precision/recall bars and grouped bar charts, each written to a PNG file.

Plain lists and nested lists in, a file out: callers keep their data in JSON and redraw at will.
Figures are built with matplotlib's object API and rendered by its Agg canvas, so nothing needs a
display and the user's own pyplot backend and figures are left alone (no `matplotlib.use`).
Each file is written atomically: a killed run never leaves half a PNG.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from tl_codebook.files import atomic_write_bytes


def _figure(figsize: tuple[float, float]) -> Figure:
    figure = Figure(figsize=figsize)
    FigureCanvasAgg(figure)  # renders PNGs without any pyplot backend
    return figure


def _save(fig: Figure, path: str | Path) -> Path:
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    return atomic_write_bytes(path, buffer.getvalue())


def _smooth(values: Sequence[float], window: int) -> list[float]:
    """Trailing mean over `window` values (shorter at the start)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_training_curves(
    curves: Mapping[str, Sequence[float]],
    path: str | Path,
    title: str = "Training loss",
    ylabel: str = "next-token loss",
    reference: Mapping[str, float] | None = None,
    offsets: Mapping[str, int] | None = None,
    zoom: tuple[float, float] | None = None,
    steps: Mapping[str, Sequence[int]] | None = None,
) -> Path:
    """One line per curve (raw values faint, a trailing mean on top); optional horizontal
    reference lines (e.g. a loss floor), per-curve step offsets (a phase that starts later) and
    a second panel showing the y range `zoom` (where the late, small differences are).

    A curve's x values are `steps[name]` when given (a log kept every few steps), else
    1, 2, ...; `offsets[name]` is added to them."""
    if not curves:
        raise ValueError("plot_training_curves needs at least one curve.")
    for name, xs in (steps or {}).items():
        if name not in curves or len(xs) != len(curves[name]):
            raise ValueError(
                f"steps[{name!r}] must give one step per value of curves[{name!r}]; got "
                f"{len(xs)} steps for {len(curves.get(name, []))} values."
            )
    n_panels = 2 if zoom is not None else 1
    fig = _figure((6.5 * n_panels, 4.0))
    axes = fig.subplots(1, n_panels, squeeze=False)
    for panel, ax in enumerate(axes[0]):
        for i, (name, values) in enumerate(curves.items()):
            color = f"C{i}"
            start = (offsets or {}).get(name, 0)
            own = (steps or {}).get(name)
            xs = (
                [start + x for x in own]
                if own is not None
                else range(start + 1, start + len(values) + 1)
            )
            window = max(1, len(values) // 50)
            ax.plot(list(xs), values, color=color, alpha=0.25, linewidth=0.8)
            ax.plot(list(xs), _smooth(list(values), window), color=color, label=name, linewidth=1.6)
        for j, (name, value) in enumerate((reference or {}).items()):
            ax.axhline(value, color="gray", linestyle=["--", ":", "-."][j % 3], label=name)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        if panel == 1 and zoom is not None:
            ax.set_ylim(*zoom)
            ax.set_title("zoomed in")
        else:
            ax.set_title(title)
            ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_code_label_heatmap(
    values: Sequence[Sequence[float]],
    path: str | Path,
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    title: str = "P(label | code)",
    xlabel: str = "label",
    ylabel: str = "code",
) -> Path:
    """A codes (rows) x labels (columns) heat map of values in [0, 1]."""
    n_rows, n_cols = len(values), len(values[0]) if values else 0
    if n_rows == 0 or n_cols == 0:
        raise ValueError("plot_code_label_heatmap needs a non-empty matrix.")
    if len(row_labels) != n_rows or len(col_labels) != n_cols:
        raise ValueError(
            f"got {len(row_labels)} row labels and {len(col_labels)} column labels for a "
            f"{n_rows} x {n_cols} matrix."
        )
    size = min(12.0, 3 + 0.18 * max(n_rows, n_cols))
    fig = _figure((size + 1.5, size))
    ax = fig.subplots()
    image = ax.imshow(values, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    step_r, step_c = max(1, n_rows // 40), max(1, n_cols // 40)
    ax.set_yticks(range(0, n_rows, step_r), list(row_labels)[::step_r], fontsize=7)
    ax.set_xticks(range(0, n_cols, step_c), list(col_labels)[::step_c], fontsize=7, rotation=90)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    return _save(fig, path)


def plot_precision_recall_bars(
    labels: Sequence[str],
    precision: Sequence[float],
    recall: Sequence[float],
    path: str | Path,
    threshold: float | None = 0.9,
    title: str = "Best code per label",
    xlabel: str = "label",
) -> Path:
    """Side-by-side precision and recall bars per label, with an optional threshold line."""
    if not (len(labels) == len(precision) == len(recall)):
        raise ValueError(
            f"labels, precision and recall must have one entry per label; got {len(labels)}, "
            f"{len(precision)}, {len(recall)}."
        )
    n = len(labels)
    fig = _figure((min(16.0, 3 + 0.3 * n), 4.0))
    ax = fig.subplots()
    xs = range(n)
    ax.bar([x - 0.2 for x in xs], precision, width=0.4, label="precision")
    ax.bar([x + 0.2 for x in xs], recall, width=0.4, label="recall")
    if threshold is not None:
        ax.axhline(threshold, color="gray", linestyle="--", label=f"threshold {threshold:g}")
    step = max(1, n // 50)
    ax.set_xticks(list(xs)[::step], list(labels)[::step], fontsize=7, rotation=90)
    ax.set_ylim(0, 1.05)
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    return _save(fig, path)


def plot_grouped_bars(
    groups: Mapping[str, Mapping[str, float]],
    path: str | Path,
    title: str = "",
    ylabel: str = "",
    ylim: tuple[float, float] | None = (0, 1.05),
) -> Path:
    """Bars of `groups[group][series]`: one cluster per group, one color per series."""
    if not groups:
        raise ValueError("plot_grouped_bars needs at least one group.")
    series = list(dict.fromkeys(s for values in groups.values() for s in values))
    width = 0.8 / len(series)
    fig = _figure((max(6.0, 1.2 * len(groups) * len(series) * 0.6), 4.0))
    ax = fig.subplots()
    for i, name in enumerate(series):
        xs = [g + (i - (len(series) - 1) / 2) * width for g in range(len(groups))]
        heights = [values.get(name, 0.0) for values in groups.values()]
        bars = ax.bar(xs, heights, width=width, label=name)
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.set_xticks(range(len(groups)), list(groups), fontsize=8)
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if len(series) > 1:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    return _save(fig, path)
