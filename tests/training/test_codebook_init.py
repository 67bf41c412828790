"""`initialise_codebook`: the one codebook initialisation (trainer, comparisons, demo)."""

import pytest
import torch

from tl_codebook import Codebook, CodebookConfig
from tl_codebook.training import CODEBOOK_INITS, initialise_codebook


def codebook(**overrides):
    return Codebook(CodebookConfig(**{"d_in": 4, "num_codes": 3, **overrides}))


def test_random_codes_come_from_the_seed_alone():
    a, b, c = codebook(init_std=2.0), codebook(init_std=2.0), codebook(init_std=2.0)
    torch.manual_seed(1)
    initialise_codebook(a, None, "random", seed=7)
    torch.manual_seed(2)
    initialise_codebook(b, None, "random", seed=7)
    initialise_codebook(c, None, "random", seed=8)
    assert torch.equal(a.codes, b.codes) and not torch.equal(a.codes, c.codes)
    big = codebook(d_in=64, num_codes=1000, init_std=2.0)
    initialise_codebook(big, None, "random", seed=0)
    assert big.codes.std().item() == pytest.approx(2.0, rel=0.02)


def test_activations_init_picks_distinct_input_rows():
    rows = torch.arange(40.0).view(10, 4)  # row i is [4i, 4i+1, 4i+2, 4i+3]
    cb = codebook()
    initialise_codebook(cb, rows, "activations", seed=0)
    picked = [int(code[0].item()) // 4 for code in cb.codes[0]]
    assert len(set(picked)) == 3 and all(
        torch.equal(cb.codes[0][j], rows[i]) for j, i in enumerate(picked)
    )
    again = codebook()
    initialise_codebook(again, rows, "activations", seed=0)
    assert torch.equal(cb.codes, again.codes)


def test_kmeans_init_finds_planted_centres_per_group():
    """Two groups of 2 dims, each group's rows on its own 3 points: codes land on them."""
    centres = torch.tensor(
        [[[0.0, 0.0], [5.0, 0.0], [0.0, 5.0]], [[1.0, 1.0], [-4.0, 1.0], [1.0, 9.0]]]
    )
    which = torch.arange(30) % 3
    rows = torch.stack([centres[0][which], centres[1][which.flip(0)]], dim=1)  # [30, 2, 2]
    cb = codebook(n_groups=2)
    initialise_codebook(cb, rows.reshape(30, 4), "kmeans", seed=0, kmeans_iters=5)
    for g in range(2):
        assert torch.cdist(centres[g], cb.codes[g]).min(1).values.max() < 1e-5


def test_bad_requests_name_the_problem():
    cb = codebook()
    with pytest.raises(
        ValueError, match="method='kmean' is not one of random, activations, kmeans"
    ):
        initialise_codebook(cb, torch.zeros(5, 4), "kmean")
    with pytest.raises(ValueError, match="needs at least num_codes=3 input rows, got 2"):
        initialise_codebook(cb, torch.zeros(2, 4), "kmeans")
    with pytest.raises(ValueError, match=r"needs rows \[n, 4\] or \[n, 1, 4\], got \(5, 3\)"):
        initialise_codebook(cb, torch.zeros(5, 3), "activations")
    with pytest.raises(ValueError, match="contain NaN or infinite values"):
        initialise_codebook(cb, torch.full((5, 4), float("nan")), "activations")
    with pytest.raises(ValueError, match="activations init needs input rows"):
        initialise_codebook(cb, None, "activations")
    assert CODEBOOK_INITS == ("random", "activations", "kmeans")
