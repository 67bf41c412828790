"""The snap on hand-built codebooks whose top-k is worked out on paper, and its gradients."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tl_codebook.snap import code_scores, gather_mean, select_codes, snap, straight_through

# Four 2-d codes of different norms, so inner product (x . c/|c|) differs from a raw dot product.
CODES = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [-1.0, 0.0], [3.0, 3.0]]])


def test_inner_product_top2_on_paper():
    x = torch.tensor([[[2.0, 0.9]]])
    # x.c/|c| = 2, 0.9, -2, 8.7/(3*sqrt 2)=2.05 -> order 3, 0, 1, 2
    ids = select_codes(x, CODES, k=2, similarity="inner_product", chunk_size=7)
    assert ids.tolist() == [[[3, 0]]]
    out = gather_mean(ids, CODES)
    assert torch.allclose(out, torch.tensor([[[2.0, 1.5]]]))


def test_euclidean_top2_on_paper():
    x = torch.tensor([[[2.0, 0.9]]])
    # |x-c| = 1.345, 2.283, 3.132, 2.326 -> order 0, 1, 3, 2
    ids = select_codes(x, CODES, k=3, similarity="euclidean", chunk_size=7)
    assert ids.tolist() == [[[0, 1, 3]]]
    scores = code_scores(x, CODES, "euclidean")
    expected = -torch.tensor(
        [math.hypot(1, 0.9), math.hypot(2, 1.1), math.hypot(3, 0.9), math.hypot(1, 2.1)]
    )
    assert torch.allclose(scores[0, 0], expected, atol=1e-5)


def test_cosine_scores_and_ranking_on_paper():
    x = torch.tensor([[[2.0, 0.9]]])
    scores = code_scores(x, CODES, "cosine")
    norm = math.hypot(2, 0.9)
    expected = torch.tensor([2 / norm, 0.9 / norm, -2 / norm, 8.7 / (3 * math.sqrt(2)) / norm])
    assert torch.allclose(scores[0, 0], expected, atol=1e-6)
    ids = select_codes(x, CODES, k=2, similarity="cosine", chunk_size=7)
    assert ids.tolist() == [[[3, 0]]]


def test_groups_pick_independently():
    codes = torch.stack([CODES[0], -CODES[0]])  # group 1 has the negated codes
    x = torch.tensor([[[2.0, 0.9], [2.0, 0.9]]])
    ids = select_codes(x, codes, k=1, similarity="inner_product", chunk_size=3)
    # group 1: -c . x/|c| = -2, -0.9, 2, -2.05 -> code 2
    assert ids.tolist() == [[[3], [2]]]
    assert torch.allclose(gather_mean(ids, codes), torch.tensor([[[3.0, 3.0], [1.0, 0.0]]]))


def test_disabled_codes_fall_back_to_next_best():
    x = torch.tensor([[[2.0, 0.9]]])
    disabled = torch.tensor([[False, False, False, True]])
    ids = select_codes(x, CODES, k=2, similarity="inner_product", chunk_size=7, disabled=disabled)
    assert ids.tolist() == [[[0, 1]]]


@pytest.mark.parametrize("similarity", ["inner_product", "cosine", "euclidean"])
def test_chunked_equals_unchunked(similarity):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(257, 3, 8, generator=g)
    codes = torch.randn(3, 50, 8, generator=g)
    small = select_codes(x, codes, 4, similarity, chunk_size=5)
    whole = select_codes(x, codes, 4, similarity, chunk_size=10_000)
    assert torch.equal(small, whole)


def _reference(x, codes, ids, downstream, commitment, reconstruction):
    """Plain-autograd version of the snap's losses, for gradient checks."""
    q = codes[torch.arange(codes.shape[0])[None, :, None], ids].mean(-2)  # [rows, groups, d]
    out = q + x - x.detach()  # value q; gradient 1 to both x and q
    n = x.shape[0]
    loss = (out * downstream).sum()
    loss = loss + reconstruction * ((q - x.detach()) ** 2).sum() / n
    loss = loss + commitment * ((x - q.detach()) ** 2).sum() / n
    return loss


@pytest.mark.parametrize(
    "commitment,reconstruction", [(0.0, 0.0), (0.0, 1.0), (0.25, 0.0), (0.5, 2.0)]
)
def test_gradients_match_plain_autograd(commitment, reconstruction):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(11, 2, 5, generator=g, dtype=torch.float64, requires_grad=True)
    codes = torch.randn(2, 7, 5, generator=g, dtype=torch.float64, requires_grad=True)
    downstream = torch.randn(11, 2, 5, generator=g, dtype=torch.float64)
    out, ids = snap(
        x, codes, k=3, commitment=commitment, reconstruction=reconstruction, chunk_size=4
    )
    (out * downstream).sum().backward()
    ours = (x.grad.clone(), codes.grad.clone())
    x.grad = codes.grad = None
    _reference(x, codes, ids, downstream, commitment, reconstruction).backward()
    assert torch.allclose(ours[0], x.grad)
    assert torch.allclose(ours[1], codes.grad)


def test_pure_straight_through_input_gradient_is_output_gradient():
    x = torch.randn(6, 1, 4, requires_grad=True)
    q = torch.randn(6, 1, 4)
    g = torch.randn(6, 1, 4)
    (straight_through(x, q) * g).sum().backward()
    assert torch.equal(x.grad, g)


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 20),
    groups=st.integers(1, 3),
    num_codes=st.integers(1, 12),
    d=st.integers(1, 6),
    k_frac=st.floats(0.0, 1.0),
    similarity=st.sampled_from(["inner_product", "cosine", "euclidean"]),
    seed=st.integers(0, 2**16),
)
def test_output_is_mean_of_true_topk(rows, groups, num_codes, d, k_frac, similarity, seed):
    k = max(1, round(k_frac * num_codes))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, groups, d, generator=g, dtype=torch.float64)
    codes = torch.randn(groups, num_codes, d, generator=g, dtype=torch.float64)
    out, ids = snap(x, codes, k, similarity, chunk_size=3)
    # the output is the mean of k codebook rows
    picked = codes[torch.arange(groups)[None, :, None], ids]
    assert torch.allclose(out, picked.mean(-2))
    # ids are distinct, best first, and the true top-k of the similarity
    scores = code_scores(x, codes, similarity)
    chosen = scores.gather(-1, ids)
    assert (chosen[..., :-1] >= chosen[..., 1:] - 1e-9).all()
    assert all(len(set(r)) == k for r in ids.reshape(-1, k).tolist())
    kth_best = scores.topk(k, dim=-1).values[..., -1:]
    assert (chosen >= kth_best - 1e-9).all()


def test_in_place_edit_of_the_output_keeps_the_gradients_right():
    """The snap's output is a tensor of its own: editing it in place (with gradients on) works and
    gives plain autograd's gradients, the edited entries passing no gradient back."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 2, 3, generator=g, dtype=torch.float64, requires_grad=True)
    codes = torch.randn(2, 5, 3, generator=g, dtype=torch.float64, requires_grad=True)
    downstream = torch.randn(6, 2, 3, generator=g, dtype=torch.float64)
    out, ids = snap(x, codes, k=2, commitment=0.5, reconstruction=1.0, chunk_size=4)
    out[1] = 0.0
    (out * downstream).sum().backward()
    ours = (x.grad.clone(), codes.grad.clone())
    x.grad = codes.grad = None
    masked = downstream.clone()
    masked[1] = 0.0
    _reference(x, codes, ids, masked, 0.5, 1.0).backward()
    assert torch.allclose(ours[0], x.grad) and torch.allclose(ours[1], codes.grad)
