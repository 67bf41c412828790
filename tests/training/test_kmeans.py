import pytest
import torch

from tl_codebook.training import kmeans as kmeans_module
from tl_codebook.training.kmeans import kmeans, kmeans_grouped


def planted_clusters(num_groups: int, num_clusters: int, dim: int, per_cluster: int, seed: int):
    """Well-separated centres (spacing ~10) with points at noise 0.05 around each."""
    gen = torch.Generator().manual_seed(seed)
    centres = 10 * torch.randn(num_groups, num_clusters, dim, generator=gen)
    labels = torch.arange(num_clusters).repeat(per_cluster)
    labels = labels[torch.randperm(len(labels), generator=gen)]
    noise = 0.05 * torch.randn(len(labels), num_groups, dim, generator=gen)
    samples = centres[:, labels].transpose(0, 1) + noise
    return samples, centres


def assert_matches_planted(found: torch.Tensor, planted: torch.Tensor, tol: float) -> None:
    """Every planted centre has exactly one found centre within `tol`."""
    dist = torch.cdist(planted, found)
    nearest = dist.argmin(-1)
    assert dist.min(-1).values.max() < tol
    assert sorted(nearest.tolist()) == list(range(planted.shape[0]))


def test_full_batch_recovers_planted_centres():
    samples, centres = planted_clusters(1, 6, 8, per_cluster=100, seed=0)
    found = kmeans(samples[:, 0], num_clusters=6, n_iters=10, seed=1)
    assert found.shape == (6, 8)
    assert_matches_planted(found, centres[0], tol=0.05)


def test_minibatch_recovers_planted_centres():
    samples, centres = planted_clusters(1, 8, 16, per_cluster=200, seed=2)
    found = kmeans(samples[:, 0], num_clusters=8, n_iters=3, batch_size=128, seed=0)
    assert_matches_planted(found, centres[0], tol=0.05)


@pytest.mark.parametrize("batch_size", [None, 256])
def test_grouped_clusters_each_group_independently(batch_size):
    samples, centres = planted_clusters(4, 5, 6, per_cluster=120, seed=3)
    found = kmeans_grouped(samples, num_clusters=5, n_iters=5, batch_size=batch_size, seed=0)
    assert found.shape == (4, 5, 6)
    for group in range(4):
        assert_matches_planted(found[group], centres[group], tol=0.05)


@pytest.mark.parametrize("init", ["kmeans++", "random"])
def test_initial_centres_are_distinct_samples(init):
    samples = torch.randn(50, 3, 4, generator=torch.Generator().manual_seed(0))
    centres = kmeans_grouped(samples, num_clusters=20, n_iters=0, init=init)
    for group in range(3):
        equal = (centres[group, :, None] == samples[None, :, group]).all(-1)
        assert equal.sum(-1).tolist() == [1] * 20  # each centre is exactly one sample
        assert len(set(equal.int().argmax(-1).tolist())) == 20  # and no sample twice


@pytest.mark.parametrize("seed", range(4))
def test_empty_cluster_is_reseeded_at_the_far_point(seed):
    # 99 copies of a and one b: a random init almost surely puts both centres on a, leaving
    # one empty; it must move to b.
    a, b = torch.zeros(3), torch.tensor([5.0, 0.0, 0.0])
    samples = torch.cat([a.expand(99, 3), b.unsqueeze(0)])
    found = kmeans(samples, num_clusters=2, n_iters=3, seed=seed, init="random")
    assert sorted(found[:, 0].tolist()) == [0.0, 5.0]
    assert torch.equal(found[:, 1:], torch.zeros(2, 2))


def test_chunked_distances_give_the_same_answer(monkeypatch):
    samples, _ = planted_clusters(2, 7, 4, per_cluster=6, seed=4)
    whole = kmeans_grouped(samples, num_clusters=7, n_iters=2, seed=5)
    monkeypatch.setattr(kmeans_module, "_CHUNK_ELEMENTS", 50)  # three samples per chunk
    chunked = kmeans_grouped(samples, num_clusters=7, n_iters=2, seed=5)
    torch.testing.assert_close(chunked, whole)


def test_same_seed_same_result_and_dtype_kept():
    samples = torch.randn(
        300, 2, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0)
    )
    first = kmeans_grouped(samples, num_clusters=10, n_iters=2, batch_size=64, seed=7)
    again = kmeans_grouped(samples, num_clusters=10, n_iters=2, batch_size=64, seed=7)
    assert first.dtype == torch.float64
    assert torch.equal(first, again)


def test_every_centre_is_a_mean_of_its_points_after_lloyd():
    samples = torch.randn(500, 3, generator=torch.Generator().manual_seed(0))
    centres = kmeans(samples, num_clusters=4, n_iters=50, seed=0)
    labels = torch.cdist(samples, centres).argmin(-1)
    for cluster in range(4):
        torch.testing.assert_close(centres[cluster], samples[labels == cluster].mean(0))


def test_fewer_samples_than_clusters_names_both_numbers():
    with pytest.raises(ValueError, match=r"got 5 samples for num_clusters=10"):
        kmeans(torch.randn(5, 3), num_clusters=10)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"init": "farthest"}, "k-means init='farthest' is not one of kmeans\\+\\+, random"),
        ({"batch_size": 0}, "batch_size must be >= 1"),
        ({"n_iters": -1}, "n_iters must be >= 0"),
        ({"num_clusters": 0}, "num_clusters must be >= 1"),
    ],
)
def test_bad_options_raise(kwargs, message):
    options = {"num_clusters": 2, **kwargs}
    with pytest.raises(ValueError, match=message):
        kmeans(torch.randn(10, 3), **options)


def test_non_finite_samples_raise():
    samples = torch.randn(10, 3)
    samples[4, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinite"):
        kmeans(samples, num_clusters=2)
