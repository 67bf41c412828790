"""Precision and recall of every unit for every concept label (e.g. "the current state is s").

A unit that fires exactly when a concept holds is a monosemantic feature for it. Units are a
codebook's codes (`code_concept_precision_recall`, from code ids) or any on/off latents such as
an SAE's (`active_concept_precision_recall`); both reduce to firing events (token, unit) counted
by one counter, so a codebook and an SAE are scored by the very same arithmetic.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

CRITERIA = ("f1", "min")


@dataclass(frozen=True)
class BestCodes:
    """For each label, the code that best matches it; group and code are -1 for unseen labels."""

    group: Int[Tensor, " num_labels"]
    code: Int[Tensor, " num_labels"]
    precision: Float[Tensor, " num_labels"]
    recall: Float[Tensor, " num_labels"]
    score: Float[Tensor, " num_labels"]
    """The criterion's value (F1 or min(precision, recall))."""


@dataclass(frozen=True)
class ConceptScores:
    """Counts, precision and recall for every (group, code, label).

    Only tokens with a label >= 0 are counted. precision = P(label | code active) and
    recall = P(code active | label); each is 0 where its condition never occurs.
    """

    joint_counts: Int[Tensor, "n_groups num_codes num_labels"]
    """Tokens where the code is active and the label holds."""
    code_counts: Int[Tensor, "n_groups num_codes"]
    """Labelled tokens where the code is active."""
    label_counts: Int[Tensor, " num_labels"]
    precision: Float[Tensor, "n_groups num_codes num_labels"]
    recall: Float[Tensor, "n_groups num_codes num_labels"]

    @classmethod
    def from_counts(
        cls,
        joint_counts: Int[Tensor, "n_groups num_codes num_labels"],
        code_counts: Int[Tensor, "n_groups num_codes"],
        label_counts: Int[Tensor, " num_labels"],
    ) -> ConceptScores:
        """Precision and recall from counts (what every counter and every sum of scores uses)."""
        joint = joint_counts.float()
        return cls(
            joint_counts=joint_counts,
            code_counts=code_counts,
            label_counts=label_counts,
            precision=joint / code_counts.clamp(min=1)[..., None].float(),
            recall=joint / label_counts.clamp(min=1).float(),
        )

    def __add__(self, other: ConceptScores) -> ConceptScores:
        """The scores of the two token sets together (counts add up), e.g. over batches."""
        if self.joint_counts.shape != other.joint_counts.shape:
            raise ValueError(
                f"Cannot add ConceptScores of shapes {tuple(self.joint_counts.shape)} and "
                f"{tuple(other.joint_counts.shape)} (n_groups, num_codes, num_labels)."
            )
        return ConceptScores.from_counts(
            self.joint_counts + other.joint_counts,
            self.code_counts + other.code_counts,
            self.label_counts + other.label_counts,
        )

    def f1(self) -> Float[Tensor, "n_groups num_codes num_labels"]:
        """2PR / (P + R), computed as 2 joint / (code count + label count) (the same number)
        from the exact counts, so equal F1s compare equal (search breaks their ties)."""
        joint = self.joint_counts.double()
        denominator = self.code_counts[..., None].double() + self.label_counts.double()
        f1 = torch.where(denominator > 0, 2 * joint / denominator.clamp(min=1), 0.0)
        return f1.to(self.precision.dtype)

    def best_code_per_label(self, criterion: str = "f1") -> BestCodes:
        """For each label, the (group, code) maximising F1 (`"f1"`) or min(precision, recall)
        (`"min"`); ties go to the lowest group, then the lowest code."""
        if criterion == "f1":
            score = self.f1()
        elif criterion == "min":
            score = torch.minimum(self.precision, self.recall)
        else:
            raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}.")
        n_groups, num_codes, num_labels = score.shape
        best_score, flat = score.reshape(n_groups * num_codes, num_labels).max(dim=0)
        group, code = flat // num_codes, flat % num_codes
        labels = torch.arange(num_labels, device=score.device)
        seen = self.label_counts > 0
        return BestCodes(
            group=torch.where(seen, group, -1),
            code=torch.where(seen, code, -1),
            precision=self.precision[group, code, labels],
            recall=self.recall[group, code, labels],
            score=best_score,
        )

    def fraction_of_labels_with_precise_code(self, threshold: float = 0.9) -> float:
        """Fraction of occurring labels with a code of precision and recall >= threshold."""
        precise = ((self.precision >= threshold) & (self.recall >= threshold)).flatten(0, 1)
        seen = self.label_counts > 0
        if not seen.any():
            raise ValueError("no label occurs in the data: every label is < 0 or unseen.")
        return precise.any(dim=0)[seen].float().mean().item()


def _firing_counts(
    token: Int[Tensor, " firings"],
    unit: Int[Tensor, " firings"],
    labels: Int[Tensor, " tokens"],
    num_units: int,
    num_labels: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """The one counter: (joint `[num_units, num_labels]`, unit counts, label counts) from the
    firing events `(token[i], unit[i])` (each pair at most once) and per-token labels.

    Only tokens with a label >= 0 are counted.
    """
    if labels.numel() and int(labels.max()) >= num_labels:
        raise ValueError(f"labels must be < num_labels={num_labels}, got {int(labels.max())}.")
    labels = labels.long()
    event_label = labels[token]
    counted = event_label >= 0
    joint = torch.bincount(
        unit[counted] * num_labels + event_label[counted], minlength=num_units * num_labels
    ).reshape(num_units, num_labels)
    label_counts = torch.bincount(labels[labels >= 0], minlength=num_labels)
    return joint, joint.sum(dim=-1), label_counts


def code_firings(
    code_ids: Int[Tensor, "tokens n_groups k"], num_codes: int
) -> tuple[Int[Tensor, " firings"], Int[Tensor, " firings"]]:
    """The firing events `(token, unit)` of a codebook's code ids, unit = group * num_codes + code.

    Code `c` of group `g` fires at a token if `c` is among that token's `k` ids in group `g`;
    a code repeated within the k ids fires once. Every counter of code activity starts here.
    """
    if num_codes < 1:
        raise ValueError(f"num_codes must be >= 1, got {num_codes}.")
    if code_ids.numel() and (code_ids.min() < 0 or code_ids.max() >= num_codes):
        raise ValueError(
            f"code ids must be in [0, {num_codes - 1}], got range "
            f"[{code_ids.min().item()}, {code_ids.max().item()}]."
        )
    n_tokens, n_groups, k = code_ids.shape
    ids = code_ids.long()
    if k > 1:
        ids = ids.sort(dim=-1).values
    first_occurrence = torch.ones_like(ids, dtype=torch.bool)
    first_occurrence[..., 1:] = ids[..., 1:] != ids[..., :-1]
    unit = torch.arange(n_groups, device=ids.device)[None, :, None] * num_codes + ids
    token = torch.arange(n_tokens, device=ids.device)[:, None, None].expand_as(ids)
    return token[first_occurrence], unit[first_occurrence]


def code_token_counts(
    code_ids: Int[Tensor, "tokens n_groups k"], num_codes: int
) -> Int[Tensor, "n_groups num_codes"]:
    """For every (group, code), the number of tokens where it fires (one bincount).

    Given the code ids of the tokens where a concept holds, these are the codes' true
    positives; given those where another code fires, the co-firing counts.
    """
    _, unit = code_firings(code_ids, num_codes)
    n_groups = code_ids.shape[1]
    return torch.bincount(unit, minlength=n_groups * num_codes).reshape(n_groups, num_codes)


def binary_concept_scores(
    true_positives: Int[Tensor, "n_groups num_codes"],
    code_counts: Int[Tensor, "n_groups num_codes"],
    n_positive: int,
    n_tokens: int,
) -> ConceptScores:
    """Scores against one yes/no concept (a token set, a regex, a mask) from counts alone.

    Label 1 is "the concept holds" (`n_positive` of `n_tokens` tokens), label 0 the rest;
    `code_counts` are each code's firings over all tokens, `true_positives` those where the
    concept holds. So `precision[..., 1]`, `recall[..., 1]` and `f1()[..., 1]` are the
    concept's, computed by the same arithmetic as every other concept score.
    """
    if not 0 <= n_positive <= n_tokens:
        raise ValueError(f"n_positive must be in [0, n_tokens={n_tokens}], got {n_positive}.")
    if bool((true_positives > code_counts).any()) or bool((true_positives < 0).any()):
        raise ValueError("true_positives must lie between 0 and code_counts for every code.")
    joint = torch.stack([code_counts - true_positives, true_positives], dim=-1)
    labels = torch.tensor([n_tokens - n_positive, n_positive], dtype=joint.dtype)
    return ConceptScores.from_counts(joint, code_counts, labels)


def code_concept_precision_recall(
    code_ids: Int[Tensor, "tokens n_groups k"],
    labels: Int[Tensor, " tokens"],
    num_codes: int,
    num_labels: int,
) -> ConceptScores:
    """Score every (group, code) of a codebook against every label.

    Code `c` of group `g` is active at a token if `c` is among that token's `k` ids in group `g`
    (a code repeated within the k ids counts once; `code_firings`). Labels < 0 mark ignored
    tokens. Memory: a few tensors of n_groups * num_codes * num_labels numbers (no tokens x
    codes matrix).
    """
    if num_codes < 1 or num_labels < 1:
        raise ValueError(f"num_codes and num_labels must be >= 1, got {num_codes}, {num_labels}.")
    if code_ids.shape[0] != labels.shape[0]:
        raise ValueError(
            f"code_ids has {code_ids.shape[0]} tokens but labels has {labels.shape[0]}."
        )
    n_groups = code_ids.shape[1]
    token, unit = code_firings(code_ids, num_codes)
    joint, unit_counts, label_counts = _firing_counts(
        token, unit, labels, n_groups * num_codes, num_labels
    )
    return ConceptScores.from_counts(
        joint.reshape(n_groups, num_codes, num_labels),
        unit_counts.reshape(n_groups, num_codes),
        label_counts,
    )


def active_concept_precision_recall(
    active: Bool[Tensor, "tokens units"],
    labels: Int[Tensor, " tokens"],
    num_labels: int,
) -> ConceptScores:
    """Score every unit that is on or off at each token (an SAE's latents, a neuron's sign, a
    codebook's one-hot activations) against every label, as one group of `units` "codes".

    The same counts as `code_concept_precision_recall`: for a codebook's activations
    (`as_method(codebook).encode(x) != 0`) both give the same scores. Labels < 0 are ignored.
    """
    if num_labels < 1:
        raise ValueError(f"num_labels must be >= 1, got {num_labels}.")
    if active.shape[0] != labels.shape[0]:
        raise ValueError(f"active has {active.shape[0]} tokens but labels has {labels.shape[0]}.")
    token, unit = active.nonzero(as_tuple=True)
    joint, unit_counts, label_counts = _firing_counts(
        token, unit, labels, active.shape[1], num_labels
    )
    return ConceptScores.from_counts(joint[None], unit_counts[None], label_counts)
