"""The circuit scoring math: hand-computed answers, and scikit-learn as a cross-check."""

import math

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from tl_codebook.comparisons.circuits.scores import (
    FRACTIONS,
    circuit_size,
    cpr_cmd,
    normalized_faithfulness,
    pr_auc,
    precision_recall_at_k,
    rank,
    roc_auc,
    roc_curve,
)

# Six scored names, three of them true, with a three-way tie at 0.5:
#   A 0.9 (false), B 0.8 (true), C 0.5 (true), D 0.5 (false), E 0.5 (false), F 0.2 (true)
SCORES = {"A": 0.9, "B": 0.8, "C": 0.5, "D": 0.5, "E": 0.5, "F": 0.2}
TRUTH = {"B", "C", "F"}


def random_case(rng: np.random.Generator, n: int) -> tuple[dict[str, float], set[str]]:
    """`n` names with few distinct scores (so many ties) and a random truth of both kinds."""
    values = rng.integers(0, 4, size=n).astype(float)
    labels = rng.random(n) < 0.3
    labels[0], labels[1] = True, False  # both classes present
    scores = {f"N{i}": float(v) for i, v in enumerate(values)}
    truth = {f"N{i}" for i in range(n) if labels[i]}
    return scores, truth


# ---- rank -------------------------------------------------------------------------------


def test_rank_descending_ties_by_name():
    assert rank({"b": 1.0, "a": 1.0, "c": 2.0, "d": -1.0}) == ["c", "a", "b", "d"]
    # string order: "L10H0" < "L2H0"
    assert rank({"L2H0": 0.0, "L10H0": 0.0}) == ["L10H0", "L2H0"]


def test_rank_accepts_ints_and_numpy_floats():
    assert rank({"x": 1, "y": np.float64(2.5)}) == ["y", "x"]


# ---- roc_auc ----------------------------------------------------------------------------


def test_roc_auc_by_hand():
    # Every (true, false) pair, 1 when the true name scores higher, 1/2 when tied:
    #   B vs A, D, E: 0 + 1 + 1 = 2;  C vs A, D, E: 0 + 1/2 + 1/2 = 1;  F vs A, D, E: 0
    #   AUC = (2 + 1 + 0) / (3 * 3) = 1/3
    assert roc_auc(SCORES, TRUTH) == pytest.approx(1 / 3)


def test_roc_auc_by_hand_via_ranks():
    # scores 0.9 (T), 0.8 (F), 0.7 (T), 0.7 (F), 0.1 (F); ascending average ranks:
    #   0.1 -> 1, the two 0.7s -> (2 + 3) / 2 = 2.5, 0.8 -> 4, 0.9 -> 5
    #   true rank sum = 5 + 2.5 = 7.5;  U = 7.5 - 2 * 3 / 2 = 4.5;  AUC = 4.5 / (2 * 3) = 0.75
    scores = {"p": 0.9, "q": 0.8, "r": 0.7, "s": 0.7, "t": 0.1}
    assert roc_auc(scores, {"p", "r"}) == pytest.approx(0.75)


def test_roc_auc_perfect_reversed_and_flat():
    scores = {"a": 4.0, "b": 3.0, "c": 2.0, "d": 1.0}
    assert roc_auc(scores, {"a", "b"}) == 1.0
    assert roc_auc(scores, {"c", "d"}) == 0.0
    assert roc_auc({"a": 1.0, "b": 1.0, "c": 1.0, "d": 1.0}, {"a"}) == 0.5


def test_roc_auc_int_scores():
    assert roc_auc({"a": 2, "b": 1}, ["a"]) == 1.0


def test_roc_auc_matches_sklearn_with_ties():
    rng = np.random.default_rng(0)
    for n in (2, 3, 7, 20, 101):
        for _ in range(20):
            scores, truth = random_case(rng, n)
            names = list(scores)
            expected = roc_auc_score([name in truth for name in names], list(scores.values()))
            assert roc_auc(scores, truth) == pytest.approx(expected, abs=1e-12)


# ---- pr_auc -----------------------------------------------------------------------------


def test_pr_auc_by_hand():
    # Thresholds in descending order (the tie at 0.5 is one threshold), kept names, TP:
    #   0.9: {A}          TP 0  P 0    R 0    R step 0    -> 0
    #   0.8: {A,B}        TP 1  P 1/2  R 1/3  R step 1/3  -> 1/6
    #   0.5: {A,B,C,D,E}  TP 2  P 2/5  R 2/3  R step 1/3  -> 2/15
    #   0.2: all six      TP 3  P 1/2  R 1    R step 1/3  -> 1/6
    #   AP = 1/6 + 2/15 + 1/6 = 14/30 = 7/15
    assert pr_auc(SCORES, TRUTH) == pytest.approx(7 / 15)


def test_pr_auc_perfect_reversed_and_flat():
    scores = {"a": 4.0, "b": 3.0, "c": 2.0, "d": 1.0}
    assert pr_auc(scores, {"a", "b"}) == 1.0
    # reversed (the true c, d come last; AP is not 0, its floor is above 0):
    #   thresholds 4, 3: R stays 0;  2: TP 1, P 1/3, R 1/2;  1: TP 2, P 1/2, R 1
    #   AP = 1/2 * 1/3 + 1/2 * 1/2 = 5/12
    assert pr_auc(scores, {"c", "d"}) == pytest.approx(5 / 12)
    # all tied: one threshold keeping everything, P = share of true names = 1/4, R 0 -> 1
    assert pr_auc({"a": 1.0, "b": 1.0, "c": 1.0, "d": 1.0}, {"a"}) == pytest.approx(0.25)


def test_pr_auc_matches_sklearn_with_ties():
    rng = np.random.default_rng(1)
    for n in (2, 3, 7, 20, 101):
        for _ in range(20):
            scores, truth = random_case(rng, n)
            names = list(scores)
            expected = average_precision_score(
                [name in truth for name in names], list(scores.values())
            )
            assert pr_auc(scores, truth) == pytest.approx(expected, abs=1e-12)


def test_aucs_ignore_insertion_order():
    reordered = dict(reversed(list(SCORES.items())))
    assert roc_auc(reordered, TRUTH) == roc_auc(SCORES, TRUTH)
    assert pr_auc(reordered, TRUTH) == pr_auc(SCORES, TRUTH)


@pytest.mark.parametrize("auc", [roc_auc, pr_auc])
def test_auc_errors(auc):
    with pytest.raises(ValueError, match=r"truth has names not in scores: \['Z'\]"):
        auc(SCORES, {"B", "Z"})
    with pytest.raises(ValueError, match=r"scored names include \['A', 'B', 'C', 'D', 'E'\] and 1"):
        auc(SCORES, {"Z"})
    with pytest.raises(ValueError, match="truth is empty: .* undefined"):
        auc(SCORES, set())
    with pytest.raises(ValueError, match="truth covers every one of the 6 scored names"):
        auc(SCORES, set(SCORES))
    with pytest.raises(ValueError, match=r"NaN scores for \['C'\]"):
        auc({**SCORES, "C": math.nan}, TRUTH)
    with pytest.raises(ValueError, match="scores is empty"):
        auc({}, set())
    with pytest.raises(ValueError, match="single string 'B'"):
        auc(SCORES, "B")


# ---- precision_recall_at_k --------------------------------------------------------------


def test_precision_recall_at_k_by_hand():
    # rank: L0H0 (3), then the tie at 2 in name order L0H1, L1H0, then L1H1 (1)
    scores = {"L1H1": 1.0, "L1H0": 2.0, "L0H1": 2.0, "L0H0": 3.0}
    truth = {"L1H0", "L1H1"}
    # default k = |truth| = 2: top {L0H0, L0H1}, no hits -> (0/2, 0/2)
    assert precision_recall_at_k(scores, truth) == (0.0, 0.0)
    # k = 3 adds L1H0: 1 hit -> (1/3, 1/2)
    assert precision_recall_at_k(scores, truth, k=3) == pytest.approx((1 / 3, 1 / 2))
    # k = 4 keeps everything: 2 hits -> (2/4, 2/2)
    assert precision_recall_at_k(scores, truth, k=4) == (0.5, 1.0)
    # k = 1: L0H0 -> (0, 0)
    assert precision_recall_at_k(scores, truth, k=1) == (0.0, 0.0)


def test_precision_recall_at_k_tie_broken_by_name():
    # "a" and "b" tie; the cut at k = 1 keeps "a", so the true "b" is missed
    assert precision_recall_at_k({"b": 1.0, "a": 1.0}, {"b"}) == (0.0, 0.0)
    assert precision_recall_at_k({"b": 1.0, "a": 1.0}, {"a"}) == (1.0, 1.0)


def test_precision_recall_at_k_perfect_and_full_truth():
    scores = {"a": 3.0, "b": 2.0, "c": 1.0}
    assert precision_recall_at_k(scores, {"a", "b"}) == (1.0, 1.0)
    # truth covering everything is fine here (unlike the AUCs)
    assert precision_recall_at_k(scores, set(scores)) == (1.0, 1.0)


def test_precision_recall_at_k_errors():
    scores = {"a": 3.0, "b": 2.0, "c": 1.0}
    with pytest.raises(ValueError, match=r"truth has names not in scores: \['z'\]"):
        precision_recall_at_k(scores, {"z"})
    with pytest.raises(ValueError, match="truth is empty: recall is undefined"):
        precision_recall_at_k(scores, [])
    with pytest.raises(ValueError, match=r"k=0 is out of range: it must be in 1\.\.3"):
        precision_recall_at_k(scores, {"a"}, k=0)
    with pytest.raises(ValueError, match="k=4 is out of range"):
        precision_recall_at_k(scores, {"a"}, k=4)
    with pytest.raises(ValueError, match="NaN"):
        precision_recall_at_k({"a": math.nan, "b": 1.0}, {"a"})


# ---- faithfulness -----------------------------------------------------------------------


def test_fractions_are_mibs_percentages():
    assert [round(100 * f, 6) for f in FRACTIONS] == [0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100]


def test_normalized_faithfulness_by_hand():
    # (m(C) - m(empty)) / (m(N) - m(empty)) = (2 - 1) / (5 - 1) = 1/4
    assert normalized_faithfulness(2.0, 1.0, 5.0) == 0.25
    assert normalized_faithfulness(5, 1, 5) == 1.0  # ints accepted
    assert normalized_faithfulness(1.0, 1.0, 5.0) == 0.0
    # can leave [0, 1]: (-3 - 1) / (5 - 1) = -1;  (9 - 1) / (5 - 1) = 2
    assert normalized_faithfulness(-3.0, 1.0, 5.0) == -1.0
    assert normalized_faithfulness(9.0, 1.0, 5.0) == 2.0
    # a metric that falls with the full model: (0 - 2) / (-2 - 2) = 1/2
    assert normalized_faithfulness(0.0, 2.0, -2.0) == 0.5


def test_normalized_faithfulness_errors():
    with pytest.raises(ValueError, match="does not depend on the model's components"):
        normalized_faithfulness(1.0, 3.0, 3.0)
    with pytest.raises(ValueError, match="finite metric values, got m_circuit=nan"):
        normalized_faithfulness(math.nan, 0.0, 1.0)
    with pytest.raises(ValueError, match="m_full=inf"):
        normalized_faithfulness(0.5, 0.0, math.inf)


@pytest.mark.parametrize(
    ("fraction", "n_items", "size"),
    [
        (0.001, 100, 1),  # 0.1 rounds up to 1
        (0.001, 5000, 5),  # exactly 5
        (0.1, 30, 3),  # 3.0000000000000004 in floats: still 3, not 4
        (0.07, 100, 7),  # 7.000000000000001 in floats: still 7
        (0.5, 7, 4),  # 3.5 rounds up
        (0.2, 1000, 200),
        (1.0, 7, 7),
        (1, 7, 7),  # int fraction accepted
        (0.0, 7, 0),
        (0.5, 0, 0),  # nothing to keep
    ],
)
def test_circuit_size(fraction, n_items, size):
    assert circuit_size(fraction, n_items) == size


def test_circuit_size_along_fractions_is_at_least_one_and_nondecreasing():
    sizes = [circuit_size(f, 32) for f in FRACTIONS]
    # 32 items: 0.032, 0.064, 0.16, 0.32, 0.64 -> 1 each; 1.6 -> 2; 3.2 -> 4; 6.4 -> 7; 16; 32
    assert sizes == [1, 1, 1, 1, 1, 2, 4, 7, 16, 32]


def test_circuit_size_errors():
    with pytest.raises(ValueError, match=r"fraction=1.5 is out of range: it must be in \[0, 1\]"):
        circuit_size(1.5, 10)
    with pytest.raises(ValueError, match="fraction=-0.1 is out of range"):
        circuit_size(-0.1, 10)
    with pytest.raises(ValueError, match="n_items=-1 is negative"):
        circuit_size(0.5, -1)


def test_cpr_cmd_identity_curve_over_fractions():
    # f(x) = x over FRACTIONS (0.001 .. 1): the trapezoid rule is exact for a straight line, so
    #   CPR = integral of x from 0.001 to 1 = (1 - 0.001^2) / 2 = 0.4999995
    #   CMD = integral of (1 - x) = (1 - 0.001) - 0.4999995 = 0.4990005
    cpr, cmd = cpr_cmd(FRACTIONS, FRACTIONS)
    assert cpr == pytest.approx(0.4999995, abs=1e-12)
    assert cmd == pytest.approx(0.4990005, abs=1e-12)


def test_cpr_cmd_constant_curves():
    # f = 1: CPR = width of [0.001, 1] = 0.999, CMD = 0 (no x = 0 point is added)
    assert cpr_cmd(FRACTIONS, [1.0] * 10) == pytest.approx((0.999, 0.0))
    # f = 0: CPR 0, CMD 0.999;  f = 2 (overshoot): CPR 1.998, CMD 0.999
    assert cpr_cmd(FRACTIONS, [0.0] * 10) == pytest.approx((0.0, 0.999))
    assert cpr_cmd(FRACTIONS, [2] * 10) == pytest.approx((1.998, 0.999))  # ints accepted


def test_cpr_cmd_by_hand():
    # x 0.25, 0.5, 1.0 and f 0.5, 1.0, 1.0:
    #   CPR = 0.25 * (0.5 + 1) / 2 + 0.5 * (1 + 1) / 2 = 0.1875 + 0.5 = 0.6875
    #   |1 - f| = 0.5, 0, 0:  CMD = 0.25 * (0.5 + 0) / 2 + 0 = 0.0625
    assert cpr_cmd([0.25, 0.5, 1.0], [0.5, 1.0, 1.0]) == pytest.approx((0.6875, 0.0625))
    # f crossing 1 between points: x 0.5, 1 and f 0, 2; |1 - f| = 1, 1 at the points, so
    #   CPR = 0.5 * (0 + 2) / 2 = 0.5 and CMD = 0.5 * (1 + 1) / 2 = 0.5 (MIB's rule; the exact
    #   area under |1 - f(x)| of the straight line would be 0.25)
    assert cpr_cmd((0.5, 1.0), (0.0, 2.0)) == pytest.approx((0.5, 0.5))


def test_cpr_cmd_errors():
    with pytest.raises(ValueError, match=r"differ in length \(2 vs 3\)"):
        cpr_cmd([0.5, 1.0], [0.0, 0.5, 1.0])
    with pytest.raises(ValueError, match=r"1 point\(s\): an area needs at least 2"):
        cpr_cmd([1.0], [1.0])
    with pytest.raises(ValueError, match="strictly increasing"):
        cpr_cmd([0.5, 0.5, 1.0], [0.0, 0.5, 1.0])
    with pytest.raises(ValueError, match="strictly increasing"):
        cpr_cmd([1.0, 0.5], [0.0, 0.5])
    with pytest.raises(ValueError, match=r"lie in \(0, 1\]"):
        cpr_cmd([0.0, 1.0], [0.0, 1.0])
    with pytest.raises(ValueError, match=r"lie in \(0, 1\]"):
        cpr_cmd([0.5, 1.5], [0.0, 1.0])
    with pytest.raises(ValueError, match="faithfulness values must be finite"):
        cpr_cmd([0.5, 1.0], [math.nan, 1.0])


def test_roc_curve_points_and_area_match_roc_auc() -> None:
    # scores a=3 (true), b=2, c=2 (true), d=1: thresholds 3, 2, 1 give
    # (fpr, tpr) = (0, 1/2), (1/2, 1), (1, 1); the area by pairs (true, false):
    # (a,b) 1, (a,d) 1, (c,b) 0.5, (c,d) 1 -> 3.5/4 = 0.875.
    scores = {"a": 3.0, "b": 2.0, "c": 2.0, "d": 1.0}
    fpr, tpr = roc_curve(scores, {"a", "c"})
    assert fpr == [0.0, 0.0, 0.5, 1.0]
    assert tpr == [0.0, 0.5, 1.0, 1.0]
    area = sum((fpr[i + 1] - fpr[i]) * (tpr[i + 1] + tpr[i]) / 2 for i in range(len(fpr) - 1))
    assert area == pytest.approx(roc_auc(scores, {"a", "c"})) == pytest.approx(0.875)
