"""K-means (full-batch Lloyd or mini-batch) in pure torch, vectorised over independent groups.

Initialises codebook vectors from real activations on whatever device they live on; distances
are computed in chunks so a samples x clusters matrix never materialises.
"""

import torch
from einops import rearrange
from jaxtyping import Bool, Float, Int
from torch import Tensor

from tl_codebook.configs import check_choice

KMEANS_INITS = ("kmeans++", "random")

# Entries of a (groups, samples, clusters) distance block computed at once: 64 MiB in float32.
_CHUNK_ELEMENTS = 2**24
# k-means++ seeds from a random pool of at least this many samples (all of them if fewer).
_MIN_INIT_POOL = 4096


def kmeans(
    samples: Float[Tensor, "n d"],
    num_clusters: int,
    n_iters: int = 25,
    batch_size: int | None = None,
    seed: int = 0,
    init: str = "kmeans++",
) -> Float[Tensor, "num_clusters d"]:
    """Cluster `samples` into `num_clusters` centres; see `kmeans_grouped` for the options."""
    centres = kmeans_grouped(
        rearrange(samples, "n d -> n 1 d"),
        num_clusters,
        n_iters=n_iters,
        batch_size=batch_size,
        seed=seed,
        init=init,
    )
    return rearrange(centres, "1 k d -> k d")


def kmeans_grouped(
    samples: Float[Tensor, "n groups d"],
    num_clusters: int,
    n_iters: int = 25,
    batch_size: int | None = None,
    seed: int = 0,
    init: str = "kmeans++",
) -> Float[Tensor, "groups num_clusters d"]:
    """Cluster each group's slice `samples[:, g]` independently, all groups at once.

    `n_iters` passes over the samples. With `batch_size=None` each pass is one Lloyd update
    (every centre moves to the mean of its points); otherwise each pass visits the samples in
    shuffled mini-batches and moves each centre by a running mean with rate 1/count (Sculley,
    2010). `init` is "kmeans++" (seeded from a random pool of max(3 * num_clusters,
    3 * batch_size, 4096) samples) or "random" (distinct random samples). A centre left with no
    points is re-seeded at the points farthest from their centres. Computation runs in at
    least float32 on the samples' device; the result has the samples' dtype.
    """
    num_samples = samples.shape[0]
    if num_clusters < 1:
        raise ValueError(f"num_clusters must be >= 1, got {num_clusters}")
    if num_samples < num_clusters:
        raise ValueError(
            f"k-means needs at least as many samples as clusters: got {num_samples} samples "
            f"for num_clusters={num_clusters}"
        )
    if n_iters < 0:
        raise ValueError(f"n_iters must be >= 0, got {n_iters}")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1 or None (full batch), got {batch_size}")
    check_choice("k-means init", init, KMEANS_INITS)
    if not torch.isfinite(samples).all():
        raise ValueError("k-means samples contain NaN or infinite values")

    compute_dtype = torch.promote_types(samples.dtype, torch.float32)
    points = rearrange(samples.detach().to(compute_dtype), "n g d -> g n d").contiguous()
    generator = torch.Generator(device=samples.device).manual_seed(seed)

    if init == "kmeans++":
        pool_size = max(3 * num_clusters, 3 * (batch_size or 0), _MIN_INIT_POOL)
        centres = _kmeans_plus_plus(points, num_clusters, pool_size, generator)
    else:
        chosen = torch.randperm(num_samples, generator=generator, device=points.device)
        centres = points[:, chosen[:num_clusters]].clone()

    counts = torch.zeros(centres.shape[:2], dtype=compute_dtype, device=points.device)
    for _ in range(n_iters):
        if batch_size is None:
            centres = _lloyd_update(points, centres)
            continue
        order = torch.randperm(num_samples, generator=generator, device=points.device)
        for start in range(0, num_samples, batch_size):
            batch = points[:, order[start : start + batch_size]]
            centres, counts = _minibatch_update(batch, centres, counts)
    return centres.to(samples.dtype)


def _kmeans_plus_plus(
    points: Float[Tensor, "g n d"], num_clusters: int, pool_size: int, generator: torch.Generator
) -> Float[Tensor, "g k d"]:
    """k-means++ seeding (Arthur & Vassilvitskii, 2007) from a random pool, per group."""
    num_groups, num_samples, _ = points.shape
    device = points.device
    pool_idx = torch.randperm(num_samples, generator=generator, device=device)[:pool_size]
    pool = points[:, pool_idx]
    pool_sq = pool.square().sum(-1)
    group_idx = torch.arange(num_groups, device=device)

    centres = pool.new_empty(num_groups, num_clusters, pool.shape[-1])
    first = torch.randint(pool.shape[1], (num_groups,), generator=generator, device=device)
    centres[:, 0] = pool[group_idx, first]
    nearest_sq = _squared_distance_to(pool, pool_sq, centres[:, 0])
    for j in range(1, num_clusters):
        # Draw proportional to squared distance by inverting the cumulative sum (much faster
        # than torch.multinomial on CPU); all-zero rows fall back to uniform.
        weights = nearest_sq + (nearest_sq.sum(-1, keepdim=True) == 0)
        cumulative = weights.cumsum(-1)
        target = cumulative[:, -1:] * torch.rand(
            num_groups, 1, generator=generator, device=device, dtype=cumulative.dtype
        )
        choice = torch.searchsorted(cumulative, target, right=True).squeeze(-1)
        choice = choice.clamp_max(pool.shape[1] - 1)
        centres[:, j] = pool[group_idx, choice]
        nearest_sq = torch.minimum(nearest_sq, _squared_distance_to(pool, pool_sq, centres[:, j]))
    return centres


def _squared_distance_to(
    pool: Float[Tensor, "g p d"], pool_sq: Float[Tensor, "g p"], centre: Float[Tensor, "g d"]
) -> Float[Tensor, "g p"]:
    cross = torch.bmm(pool, centre.unsqueeze(-1)).squeeze(-1)
    return (pool_sq - 2 * cross + centre.square().sum(-1, keepdim=True)).clamp_min(0)


def _assign(
    points: Float[Tensor, "g n d"], centres: Float[Tensor, "g k d"]
) -> tuple[Float[Tensor, "g n"], Int[Tensor, "g n"], Float[Tensor, "g k d"], Float[Tensor, "g k"]]:
    """Nearest centre of every point, chunked over points; also per-centre sums and counts."""
    num_groups, num_samples, dim = points.shape
    num_clusters = centres.shape[1]
    centre_sq = centres.square().sum(-1).unsqueeze(1)
    centres_t = centres.transpose(1, 2)
    nearest_sq = points.new_empty(num_groups, num_samples)
    nearest = torch.empty(num_groups, num_samples, dtype=torch.long, device=points.device)
    sums = torch.zeros_like(centres)
    counts = points.new_zeros(num_groups, num_clusters)
    chunk = max(1, _CHUNK_ELEMENTS // (num_groups * num_clusters))
    for start in range(0, num_samples, chunk):
        block = points[:, start : start + chunk]
        dist_sq = torch.baddbmm(centre_sq, block, centres_t, alpha=-2)
        dist_sq += block.square().sum(-1, keepdim=True)
        block_sq, block_idx = dist_sq.min(-1)
        nearest_sq[:, start : start + chunk] = block_sq.clamp_min(0)
        nearest[:, start : start + chunk] = block_idx
        sums.scatter_add_(1, block_idx.unsqueeze(-1).expand(-1, -1, dim), block)
        counts.scatter_add_(1, block_idx, torch.ones_like(block_sq))
    return nearest_sq, nearest, sums, counts


def _lloyd_update(
    points: Float[Tensor, "g n d"], centres: Float[Tensor, "g k d"]
) -> Float[Tensor, "g k d"]:
    nearest_sq, _, sums, counts = _assign(points, centres)
    empty = counts == 0
    means = sums / counts.clamp_min(1).unsqueeze(-1)
    centres = torch.where(empty.unsqueeze(-1), centres, means)
    centres, _ = _reseed_empty(centres, empty, points, nearest_sq)
    return centres


def _minibatch_update(
    batch: Float[Tensor, "g b d"], centres: Float[Tensor, "g k d"], counts: Float[Tensor, "g k"]
) -> tuple[Float[Tensor, "g k d"], Float[Tensor, "g k"]]:
    nearest_sq, _, sums, batch_counts = _assign(batch, centres)
    counts = counts + batch_counts
    # Running mean over every point a centre has seen: c += (sum - n_batch * c) / n_total.
    step = (sums - batch_counts.unsqueeze(-1) * centres) / counts.clamp_min(1).unsqueeze(-1)
    centres = centres + step
    centres, reseeded = _reseed_empty(centres, counts == 0, batch, nearest_sq)
    return centres, torch.where(reseeded, torch.ones_like(counts), counts)


def _reseed_empty(
    centres: Float[Tensor, "g k d"],
    empty: Bool[Tensor, "g k"],
    points: Float[Tensor, "g n d"],
    nearest_sq: Float[Tensor, "g n"],
) -> tuple[Float[Tensor, "g k d"], Bool[Tensor, "g k"]]:
    """Move each group's empty centres onto that group's farthest points, one point each."""
    max_empty = int(empty.sum(-1).max())
    if max_empty == 0:
        return centres, empty
    num_far = min(max_empty, points.shape[1])
    farthest = nearest_sq.topk(num_far, dim=-1).indices
    rank = empty.long().cumsum(-1) - 1
    reseeded = empty & (rank < num_far)
    source = farthest.gather(-1, rank.clamp(0, num_far - 1))
    replacement = points.gather(1, source.unsqueeze(-1).expand(-1, -1, points.shape[-1]))
    return torch.where(reseeded.unsqueeze(-1), replacement, centres), reseeded
