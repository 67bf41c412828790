"""Code-concept precision and recall on planted code/label mappings."""

import pytest
import torch

from tl_codebook.analysis.concepts import (
    active_concept_precision_recall,
    code_concept_precision_recall,
)


def planted():
    """Code 3 fires on all 4 tokens of label 1 and on 2 of the 4 tokens of label 2; code 5 on
    the other 2 of label 2; 2 unlabelled tokens (also code 3) are ignored; label 0 never occurs."""
    codes = [3, 3, 3, 3, 3, 3, 5, 5, 3, 3]
    labels = [1, 1, 1, 1, 2, 2, 2, 2, -1, -1]
    code_ids = torch.tensor(codes)[:, None, None]  # one group, k = 1
    return code_concept_precision_recall(code_ids, torch.tensor(labels), num_codes=6, num_labels=3)


def test_planted_precision_and_recall():
    scores = planted()
    assert scores.precision.shape == scores.recall.shape == (1, 6, 3)
    assert scores.precision[0, 3].tolist() == pytest.approx([0, 2 / 3, 1 / 3])
    assert scores.recall[0, 3].tolist() == pytest.approx([0, 1, 1 / 2])
    assert scores.precision[0, 5].tolist() == pytest.approx([0, 0, 1])
    assert scores.recall[0, 5].tolist() == pytest.approx([0, 0, 1 / 2])
    assert scores.code_counts[0].tolist() == [0, 0, 0, 6, 0, 2]
    assert scores.label_counts.tolist() == [0, 4, 4]
    assert scores.precision[0, [0, 1, 2, 4]].abs().sum() == 0


def test_best_code_per_label():
    best = planted().best_code_per_label()
    # label 1: code 3 (F1 0.8); label 2: code 5 (F1 2/3) beats code 3 (F1 0.4)
    assert best.group.tolist() == [-1, 0, 0]
    assert best.code.tolist() == [-1, 3, 5]
    assert best.precision[1:].tolist() == pytest.approx([2 / 3, 1])
    assert best.recall[1:].tolist() == pytest.approx([1, 1 / 2])
    assert best.score[1:].tolist() == pytest.approx([0.8, 2 / 3])
    by_min = planted().best_code_per_label("min")
    assert by_min.code.tolist() == [-1, 3, 5]
    assert by_min.score[1:].tolist() == pytest.approx([2 / 3, 1 / 2])
    with pytest.raises(ValueError, match="criterion must be one of"):
        planted().best_code_per_label("auc")


def test_fraction_of_labels_with_precise_code():
    scores = planted()  # label 0 never occurs and is not counted
    assert scores.fraction_of_labels_with_precise_code(0.9) == 0.0
    assert scores.fraction_of_labels_with_precise_code(0.6) == 0.5
    assert scores.fraction_of_labels_with_precise_code(0.5) == 1.0


def test_groups_and_top_k_match_a_direct_count():
    generator = torch.Generator().manual_seed(0)
    n_tokens, n_groups, k, num_codes, num_labels = 200, 3, 2, 7, 5
    code_ids = torch.randint(num_codes, (n_tokens, n_groups, k), generator=generator)
    labels = torch.randint(-1, num_labels, (n_tokens,), generator=generator)
    scores = code_concept_precision_recall(code_ids, labels, num_codes, num_labels)
    joint = torch.zeros(n_groups, num_codes, num_labels, dtype=torch.long)
    for token in range(n_tokens):
        if labels[token] < 0:
            continue
        for group in range(n_groups):
            for code in set(code_ids[token, group].tolist()):  # a repeated id counts once
                joint[group, code, labels[token]] += 1
    assert torch.equal(scores.joint_counts, joint)
    label_counts = torch.bincount(labels[labels >= 0], minlength=num_labels)
    active = joint.sum(-1, keepdim=True)
    assert torch.allclose(scores.precision, joint / active.clamp(min=1))
    assert torch.allclose(scores.recall, joint / label_counts)


def test_bad_inputs_raise():
    ids = torch.tensor([[[0]], [[1]]])
    with pytest.raises(ValueError, match=r"code ids must be in \[0, 1\], got range \[1, 2\]"):
        code_concept_precision_recall(ids + 1, torch.tensor([0, 0]), num_codes=2, num_labels=1)
    with pytest.raises(ValueError, match="labels must be < num_labels=1, got 1"):
        code_concept_precision_recall(ids, torch.tensor([0, 1]), num_codes=2, num_labels=1)
    with pytest.raises((ValueError, TypeError)):  # the runtime shape check may answer first
        code_concept_precision_recall(ids, torch.tensor([0, 0, 0]), num_codes=2, num_labels=1)


def test_active_units_and_code_ids_are_counted_alike():
    """A codebook's code ids and the same firings as on/off units give the very same scores."""
    generator = torch.Generator().manual_seed(1)
    n_tokens, n_groups, k, num_codes, num_labels = 50, 2, 2, 5, 3
    code_ids = torch.randint(num_codes, (n_tokens, n_groups, k), generator=generator)
    labels = torch.randint(-1, num_labels, (n_tokens,), generator=generator)
    active = torch.zeros(n_tokens, n_groups, num_codes, dtype=torch.bool)
    active.scatter_(-1, code_ids, True)
    by_ids = code_concept_precision_recall(code_ids, labels, num_codes, num_labels)
    by_units = active_concept_precision_recall(active.flatten(1), labels, num_labels)
    assert torch.equal(by_units.joint_counts.view_as(by_ids.joint_counts), by_ids.joint_counts)
    assert torch.equal(by_units.precision.view_as(by_ids.precision), by_ids.precision)
    assert torch.equal(by_units.recall.view_as(by_ids.recall), by_ids.recall)


def test_scores_of_two_batches_add_up_to_the_scores_of_both():
    generator = torch.Generator().manual_seed(2)
    active = torch.rand(40, 6, generator=generator) > 0.5
    labels = torch.randint(-1, 4, (40,), generator=generator)
    whole = active_concept_precision_recall(active, labels, 4)
    parts = active_concept_precision_recall(active[:15], labels[:15], 4)
    parts = parts + active_concept_precision_recall(active[15:], labels[15:], 4)
    assert torch.equal(parts.joint_counts, whole.joint_counts)
    assert torch.equal(parts.precision, whole.precision)
    with pytest.raises(ValueError, match="Cannot add ConceptScores"):
        whole + active_concept_precision_recall(active[:, :3], labels, 4)
