"""Precision and recall of every code for every concept label (e.g. "the current state is s").

A code that fires exactly when a concept holds is a monosemantic feature for it; these scores
find such codes from cached code ids and per-token labels, with counts rather than loops.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
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

    def f1(self) -> Float[Tensor, "n_groups num_codes num_labels"]:
        denominator = self.precision + self.recall
        return torch.where(
            denominator > 0, 2 * self.precision * self.recall / denominator.clamp(min=1e-12), 0.0
        )

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


def code_concept_precision_recall(
    code_ids: Int[Tensor, "tokens n_groups k"],
    labels: Int[Tensor, " tokens"],
    num_codes: int,
    num_labels: int,
) -> ConceptScores:
    """Score every (group, code) against every label.

    Code `c` of group `g` is active at a token if `c` is among that token's `k` ids in group `g`
    (a code repeated within the k ids counts once). Labels < 0 mark ignored tokens. Memory:
    a few tensors of n_groups * num_codes * num_labels numbers.
    """
    if num_codes < 1 or num_labels < 1:
        raise ValueError(f"num_codes and num_labels must be >= 1, got {num_codes}, {num_labels}.")
    if code_ids.shape[0] != labels.shape[0]:
        raise ValueError(
            f"code_ids has {code_ids.shape[0]} tokens but labels has {labels.shape[0]}."
        )
    if labels.numel() and labels.max() >= num_labels:
        raise ValueError(f"labels must be < num_labels={num_labels}, got {labels.max().item()}.")
    if code_ids.numel() and (code_ids.min() < 0 or code_ids.max() >= num_codes):
        raise ValueError(
            f"code ids must be in [0, {num_codes - 1}], got range "
            f"[{code_ids.min().item()}, {code_ids.max().item()}]."
        )
    n_groups = code_ids.shape[1]
    keep = labels >= 0
    ids, kept_labels = code_ids[keep].sort(dim=-1).values, labels[keep].long()
    first_occurrence = torch.ones_like(ids, dtype=torch.bool)
    first_occurrence[..., 1:] = ids[..., 1:] != ids[..., :-1]
    flat_code = torch.arange(n_groups, device=ids.device)[None, :, None] * num_codes + ids
    flat_code, token_label = flat_code[first_occurrence], kept_labels[:, None, None].expand_as(ids)
    token_label = token_label[first_occurrence]

    n_codes_total = n_groups * num_codes
    joint = torch.bincount(
        flat_code * num_labels + token_label, minlength=n_codes_total * num_labels
    )
    joint_counts = joint.reshape(n_groups, num_codes, num_labels)
    code_counts = joint_counts.sum(dim=-1)
    label_counts = torch.bincount(kept_labels, minlength=num_labels)

    joint_float = joint_counts.float()
    precision = joint_float / code_counts.clamp(min=1)[..., None].float()
    recall = joint_float / label_counts.clamp(min=1).float()
    return ConceptScores(
        joint_counts=joint_counts,
        code_counts=code_counts,
        label_counts=label_counts,
        precision=precision,
        recall=recall,
    )
