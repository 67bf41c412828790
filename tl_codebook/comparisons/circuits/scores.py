"""How well a circuit-discovery method did: the scoring math, with no model runs.

A method gives a score per graph item (a node "L1H3" or an edge "L0H2->L1H3"); higher means
"more likely in the circuit". Two families of measures judge it:

* Against a known circuit (a set of item names), how well the scores *rank* the true items
  above the rest: `roc_auc`, `pr_auc` (average precision) and `precision_recall_at_k`. These
  need no model at all, only the scores and the truth.
* Without a known circuit, MIB's faithfulness curve (Mueller et al. 2025, "MIB: A Mechanistic
  Interpretability Benchmark"): keep the top `circuit_size(fraction, n)` items for each fraction
  in `FRACTIONS`, run the model with the rest ablated, normalise the task metric with
  `normalized_faithfulness`, and summarise the curve with `cpr_cmd`. The model runs happen
  elsewhere; this module only does the arithmetic on their results.

The definitions are written out here (rather than borrowed from scikit-learn) so that what a
number means is explicit; the tests check them against scikit-learn's `roc_auc_score` and
`average_precision_score`. Every function raises `ValueError` with a message naming the problem
instead of returning a silent NaN: an AUC with no true items, or a truth name the method never
scored, is a bug in the caller, not a score.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence

import numpy as np

__all__ = [
    "FRACTIONS",
    "circuit_size",
    "cpr_cmd",
    "normalized_faithfulness",
    "pr_auc",
    "precision_recall_at_k",
    "rank",
    "roc_auc",
    "roc_curve",
]

FRACTIONS: tuple[float, ...] = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
"""The fractions of the graph's items (edges or nodes) kept along MIB's faithfulness curve:
its percentages 0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50 and 100%."""

_SHOWN = 5  # how many names an error message lists


def _listing(names: Collection[str]) -> str:
    """A few of `names`, sorted, for an error message."""
    shown = sorted(names)[:_SHOWN]
    more = len(names) - len(shown)
    return repr(shown) + (f" and {more} more" if more > 0 else "")


def _checked_scores(scores: Mapping[str, float | int]) -> dict[str, float]:
    """`scores` as plain floats; ValueError when it is empty or a score is NaN."""
    if len(scores) == 0:
        raise ValueError("scores is empty: there are no scored names to rank.")
    out = {name: float(value) for name, value in scores.items()}
    nan = [name for name, value in out.items() if math.isnan(value)]
    if nan:
        raise ValueError(
            f"scores has NaN scores for {_listing(nan)}: a NaN cannot be ranked; "
            "give those names a number (e.g. -inf to rank them last)."
        )
    return out


def _checked_truth(scores: Mapping[str, float], truth: Collection[str]) -> set[str]:
    """`truth` as a set; ValueError when it names something `scores` does not score."""
    if isinstance(truth, str):
        raise ValueError(
            f"truth is the single string {truth!r}: pass a collection of names, e.g. {{{truth!r}}}."
        )
    truth_set = set(truth)
    missing = truth_set - scores.keys()
    if missing:
        raise ValueError(
            f"truth has names not in scores: {_listing(missing)}; "
            f"scored names include {_listing(scores.keys())}."
        )
    return truth_set


def _labelled(
    scores: Mapping[str, float | int], truth: Collection[str], what: str
) -> tuple[np.ndarray, np.ndarray]:
    """(score per name, 1.0 where the name is in `truth`) for an AUC, checked.

    Raises ValueError when the AUC `what` is undefined: no true names, or no false ones.
    """
    checked = _checked_scores(scores)
    truth_set = _checked_truth(checked, truth)
    if not truth_set:
        raise ValueError(f"truth is empty: {what} is undefined without any true names.")
    if len(truth_set) == len(checked):
        raise ValueError(
            f"truth covers every one of the {len(checked)} scored names: {what} is undefined "
            "without any false names."
        )
    names = sorted(checked)
    values = np.array([checked[name] for name in names], dtype=np.float64)
    labels = np.array([name in truth_set for name in names], dtype=np.float64)
    return values, labels


def rank(scores: Mapping[str, float | int]) -> list[str]:
    """The names of `scores` from the highest score to the lowest; tied scores in name order.

    Name order is Python's string order ("L10H0" comes before "L2H0"): arbitrary but
    deterministic, so a cut through a tie always keeps the same names.

    Raises:
        ValueError: when `scores` is empty or has a NaN score.
    """
    checked = _checked_scores(scores)
    return sorted(checked, key=lambda name: (-checked[name], name))


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks of `values` in ascending order, tied values sharing their average rank."""
    unique, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    first = np.cumsum(counts) - counts  # 0-based position of each distinct value's first copy
    # the copies of a value take ranks first+1 .. first+count, whose average is first+(count+1)/2
    average = first + (counts + 1) / 2.0
    return average[inverse.reshape(-1)]


def roc_auc(scores: Mapping[str, float | int], truth: Collection[str]) -> float:
    """Area under the ROC curve of ranking the names in `scores` by score against `truth`.

    The probability that a random true name scores above a random false one, ties counting
    half: the Mann-Whitney U statistic over (number true x number false), with tied scores
    given their average rank. 1.0 is a perfect ranking, 0.0 the reverse, 0.5 chance (and what
    all-equal scores give). Names in `scores` but not in `truth` are the false ones.

    Raises:
        ValueError: when `truth` names something not in `scores`, is empty, or covers every
            scored name (the AUC is undefined), or when a score is NaN.
    """
    values, labels = _labelled(scores, truth, "ROC AUC")
    n_true = float(labels.sum())
    n_false = float(labels.size) - n_true
    true_rank_sum = float(_average_ranks(values)[labels == 1.0].sum())
    u = true_rank_sum - n_true * (n_true + 1.0) / 2.0
    return u / (n_true * n_false)


def roc_curve(
    scores: Mapping[str, float | int], truth: Collection[str]
) -> tuple[list[float], list[float]]:
    """The ROC curve's points (false-positive rates, true-positive rates) from (0, 0) to (1, 1),
    one point per distinct score threshold (tied names enter together); its trapezoid area is
    `roc_auc`. What the report plots.

    Raises:
        ValueError: as `roc_auc`.
    """
    values, labels = _labelled(scores, truth, "ROC curve")
    n_true = float(labels.sum())
    n_false = float(labels.size) - n_true
    fpr, tpr = [0.0], [0.0]
    for threshold in np.unique(values)[::-1]:
        above = values >= threshold
        tpr.append(float(labels[above].sum()) / n_true)
        fpr.append(float((1.0 - labels[above]).sum()) / n_false)
    return fpr, tpr


def pr_auc(scores: Mapping[str, float | int], truth: Collection[str]) -> float:
    """Average precision: the step-wise area under the precision-recall curve.

    Scikit-learn's `average_precision_score`: with the distinct scores t_1 > t_2 > ... as
    thresholds, keeping the names scoring >= t_k gives precision P_k and recall R_k, and
    AP = sum_k (R_k - R_{k-1}) * P_k with R_0 = 0. Tied scores are one threshold, so a tie's
    true and false names enter together (all-equal scores give the share of true names). It
    is 1.0 for a perfect ranking and, unlike the ROC AUC, its chance level is the share of true
    names, so it rewards finding a small circuit among many items.

    Raises:
        ValueError: when `truth` names something not in `scores`, is empty, or covers every
            scored name (the AUC is undefined), or when a score is NaN.
    """
    values, labels = _labelled(scores, truth, "PR AUC (average precision)")
    order = np.argsort(-values, kind="stable")
    values, labels = values[order], labels[order]
    # the last index of each run of equal scores: where each threshold's kept set ends
    ends = np.flatnonzero(np.append(np.diff(values) != 0.0, True))
    true_kept = np.cumsum(labels)[ends]
    precision = true_kept / (ends + 1.0)
    recall = true_kept / labels.sum()
    recall_step = np.diff(recall, prepend=0.0)
    return float(np.sum(recall_step * precision))


def precision_recall_at_k(
    scores: Mapping[str, float | int], truth: Collection[str], k: int | None = None
) -> tuple[float, float]:
    """(precision, recall) of the `k` top-ranked names of `scores` as a guess at `truth`.

    The top k are `rank(scores)[:k]`: a tie at the cut is broken by name order, so the result
    is deterministic but depends on the names for tied scores. `k` defaults to `len(truth)`,
    "at the true circuit size", where precision and recall are equal.

    Raises:
        ValueError: when `truth` names something not in `scores` or is empty (recall is
            undefined), when a score is NaN, or when `k` is not in 1..len(scores).
    """
    checked = _checked_scores(scores)
    truth_set = _checked_truth(checked, truth)
    if not truth_set:
        raise ValueError("truth is empty: recall is undefined without any true names.")
    if k is None:
        k = len(truth_set)
    if not 1 <= k <= len(checked):
        raise ValueError(
            f"k={k} is out of range: it must be in 1..{len(checked)}, the scored names."
        )
    hits = sum(name in truth_set for name in rank(checked)[:k])
    return hits / k, hits / len(truth_set)


def normalized_faithfulness(
    m_circuit: float | int, m_empty: float | int, m_full: float | int
) -> float:
    """MIB's faithfulness of a circuit: f = (m(C) - m(empty)) / (m(N) - m(empty)).

    `m_circuit` is the task metric with only the circuit C kept (the rest ablated), `m_empty`
    with everything ablated and `m_full` for the whole model N. f = 1 when the circuit does
    what the model does, 0 when it does no better than nothing; it can leave [0, 1].

    Raises:
        ValueError: when `m_full == m_empty` (the metric does not depend on the model's
            components, so no circuit can be told apart) or a value is not finite.
    """
    values = {"m_circuit": m_circuit, "m_empty": m_empty, "m_full": m_full}
    bad = [f"{name}={value}" for name, value in values.items() if not math.isfinite(value)]
    if bad:
        raise ValueError(f"faithfulness needs finite metric values, got {', '.join(bad)}.")
    if m_full == m_empty:
        raise ValueError(
            f"m_full == m_empty == {m_full}: the metric does not depend on the model's "
            "components (ablating everything changes nothing), so faithfulness is undefined."
        )
    return (float(m_circuit) - float(m_empty)) / (float(m_full) - float(m_empty))


def circuit_size(fraction: float | int, n_items: int) -> int:
    """How many top-ranked items keeping `fraction` of `n_items` means: ceil(fraction * n_items).

    At least 1 when `fraction > 0` (and `n_items > 0`), so the smallest fractions of a small
    graph still keep something; at most `n_items`; 0 for `fraction == 0`. A product within
    1e-9 of a whole number counts as that number, so float error does not round up
    (0.1 * 30 is 3.0000000000000004 in floats, which keeps 3, not 4).

    MIB's own evaluation keeps `int(fraction * n_items)` (rounding down, possibly to 0); this
    rounds up so that no fraction of the curve is an empty circuit.

    Raises:
        ValueError: when `fraction` is not in [0, 1] or `n_items` is negative.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction={fraction} is out of range: it must be in [0, 1].")
    if n_items < 0:
        raise ValueError(f"n_items={n_items} is negative: it counts the graph's items.")
    product = float(fraction) * n_items
    nearest = round(product)
    size = nearest if math.isclose(product, nearest, abs_tol=1e-9) else math.ceil(product)
    if fraction > 0.0:
        size = max(size, 1)
    return min(size, n_items)


def cpr_cmd(
    fractions: Sequence[float | int], faithfulness: Sequence[float | int]
) -> tuple[float, float]:
    """MIB's (CPR, CMD) of a faithfulness curve f(x), x the fraction of the graph kept.

    CPR, the area under f (higher is better), and CMD, the area under |1 - f| (lower is
    better; 0 means every circuit on the curve does exactly what the model does). Both use
    the trapezoid rule over the given points on a linear x axis, as MIB's
    `evaluate_area_under_curve` does: no x = 0 point is added and x is not rescaled, so over
    `FRACTIONS` the curve spans [0.001, 1] and f = 1 everywhere gives CPR 0.999. As in MIB,
    |1 - f| is taken at the points and then interpolated, so where f crosses 1 between two
    points CMD is larger than the exact area under |1 - f(x)| of the straight-line curve.

    Raises:
        ValueError: when the sequences differ in length or have fewer than 2 points, when the
            fractions are not strictly increasing in (0, 1], or a value is not finite.
    """
    if len(fractions) != len(faithfulness):
        raise ValueError(
            f"fractions and faithfulness differ in length ({len(fractions)} vs "
            f"{len(faithfulness)}): they must be one faithfulness per fraction."
        )
    if len(fractions) < 2:
        raise ValueError(f"the curve has {len(fractions)} point(s): an area needs at least 2.")
    x = np.array([float(v) for v in fractions], dtype=np.float64)
    f = np.array([float(v) for v in faithfulness], dtype=np.float64)
    if not (np.all(np.isfinite(x)) and x[0] > 0.0 and x[-1] <= 1.0):
        raise ValueError(f"fractions must lie in (0, 1], got {x.tolist()}.")
    if not np.all(np.diff(x) > 0.0):
        raise ValueError(f"fractions must be strictly increasing, got {x.tolist()}.")
    if not np.all(np.isfinite(f)):
        raise ValueError(f"faithfulness values must be finite, got {f.tolist()}.")
    widths = np.diff(x)
    cpr = float(np.sum(widths * (f[:-1] + f[1:]) / 2.0))
    gap = np.abs(1.0 - f)
    cmd = float(np.sum(widths * (gap[:-1] + gap[1:]) / 2.0))
    return cpr, cmd
