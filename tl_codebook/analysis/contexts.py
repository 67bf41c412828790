"""Per-code questions answered from a code cache: where a code fires (top, random and quantile
contexts), how often (density), with which other codes (co-firing) and over whole documents
(topic codes).

Every per-code query reads the code's positions from the cache's inverted index, so it costs
O(firings), not O(tokens); `topic_codes` and `code_density` read the index of a whole codebook.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from jaxtyping import Float, Int

from tl_codebook.analysis.search import CodeCacheLike, flat_codes, token_counts_at


@dataclass(frozen=True)
class CodeContext:
    """A window of tokens around one firing of a code.

    `seq`, `pos`: the firing token in the cache; `token_ids`: the window (clipped at the
    sequence's ends); `center`: the index of the firing token inside `token_ids`; `score`: the
    similarity of the code at that token when the cache stores scores, else None.
    """

    seq: int
    """The sequence (row of the cache) of the firing token."""
    pos: int
    """The firing token's position in its sequence."""
    token_ids: list[int]
    """The window's token ids, at most `2 * window + 1`."""
    center: int
    """Index of the firing token in `token_ids`."""
    score: float | None = None
    """The chosen code's similarity there, when the cache stores scores."""

    def to_dict(self) -> dict[str, Any]:
        """The context as a plain JSON-ready dict (field name -> value)."""
        return asdict(self)


def _check_window(n: int, window: int) -> None:
    if isinstance(n, bool) or n < 0:
        raise ValueError(f"n must be an integer >= 0, got {n!r}.")
    if isinstance(window, bool) or window < 0:
        raise ValueError(f"window must be an integer >= 0, got {window!r}.")


def _positions(cache: CodeCacheLike, hook: str, code: int, group: int) -> np.ndarray:
    cache.check_code(hook, code, group)
    return np.asarray(cache.index(hook).positions_of(code, group), dtype=np.int64)


def firing_scores(
    cache: CodeCacheLike,
    hook: str,
    code: int,
    group: int,
    flat_positions: Int[np.ndarray, " firings"],
) -> Float[np.ndarray, " firings"] | None:
    """The stored similarity of `code` at each of its firing positions (the best of its slots
    where it was chosen more than once), or None when the cache has no scores."""
    scores = cache.scores(hook)
    if scores is None:
        return None
    slots = flat_codes(cache, hook)[flat_positions, group]  # [firings, k]
    values = scores.reshape(-1, *scores.shape[-2:])[flat_positions, group].astype(np.float32)
    return np.where(slots == code, values, -np.inf).max(axis=-1)


def _contexts(
    cache: CodeCacheLike,
    flat_positions: np.ndarray,
    scores: np.ndarray | None,
    window: int,
) -> list[CodeContext]:
    tokens, seq_len = cache.tokens, cache.seq_len
    out = []
    for i, flat in enumerate(flat_positions.tolist()):
        seq, pos = divmod(flat, seq_len)
        lo, hi = max(0, pos - window), min(seq_len, pos + window + 1)
        out.append(
            CodeContext(
                seq=seq,
                pos=pos,
                token_ids=np.asarray(tokens[seq, lo:hi]).tolist(),
                center=pos - lo,
                score=None if scores is None else float(scores[i]),
            )
        )
    return out


def _ranked(
    cache: CodeCacheLike, hook: str, code: int, group: int
) -> tuple[np.ndarray, np.ndarray | None]:
    """The code's firing positions best score first (ties, and caches without scores: corpus
    order, i.e. (seq, pos) ascending) and their scores."""
    positions = _positions(cache, hook, code, group)
    scores = firing_scores(cache, hook, code, group, positions)
    if scores is None:
        return positions, None
    order = np.argsort(-scores, kind="stable")
    return positions[order], scores[order]


def top_contexts(
    cache: CodeCacheLike, hook: str, code: int, group: int = 0, n: int = 20, window: int = 8
) -> list[CodeContext]:
    """The `n` firings of `code` with the highest stored score, each with `window` tokens on
    either side; without stored scores, the first `n` firings in corpus order ((seq, pos)
    ascending). Ties in score keep corpus order."""
    _check_window(n, window)
    positions = _positions(cache, hook, code, group)
    scores = firing_scores(cache, hook, code, group, positions)
    if scores is None:
        return _contexts(cache, positions[:n], None, window)
    if n < positions.size:  # only candidates at or above the n-th best score are sorted
        threshold = np.partition(scores, positions.size - n)[positions.size - n]
        candidates = np.flatnonzero(scores >= threshold)
    else:
        candidates = np.arange(positions.size)
    chosen = candidates[np.argsort(-scores[candidates], kind="stable")][:n]
    return _contexts(cache, positions[chosen], scores[chosen], window)


def random_contexts(
    cache: CodeCacheLike,
    hook: str,
    code: int,
    group: int = 0,
    n: int = 20,
    window: int = 8,
    seed: int = 0,
) -> list[CodeContext]:
    """`n` firings of `code` drawn uniformly without replacement (all if it fires fewer times),
    listed in corpus order; the same seed gives the same sample."""
    _check_window(n, window)
    positions = _positions(cache, hook, code, group)
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(positions.size, size=min(n, positions.size), replace=False))
    scores = firing_scores(cache, hook, code, group, positions[chosen])
    return _contexts(cache, positions[chosen], scores, window)


def quantile_contexts(
    cache: CodeCacheLike,
    hook: str,
    code: int,
    group: int = 0,
    n_quantiles: int = 10,
    n: int = 5,
    window: int = 8,
    seed: int = 0,
) -> list[list[CodeContext]]:
    """Contexts from across the range of a code's firings, as SAE dashboards show: the firings
    ranked by stored score (best first) are cut into `n_quantiles` groups of equal size, and
    `n` are drawn from each (seeded), listed in rank order. Without stored scores the groups
    are stretches of corpus order instead. Returns one list per group, the first the best
    (a code with fewer firings than groups leaves some lists empty)."""
    _check_window(n, window)
    if isinstance(n_quantiles, bool) or n_quantiles < 1:
        raise ValueError(f"n_quantiles must be an integer >= 1, got {n_quantiles!r}.")
    positions, scores = _ranked(cache, hook, code, group)
    rng = np.random.default_rng(seed)
    out = []
    for ranks in np.array_split(np.arange(positions.size), n_quantiles):
        chosen = np.sort(rng.choice(ranks, size=min(n, ranks.size), replace=False))
        out.append(
            _contexts(cache, positions[chosen], None if scores is None else scores[chosen], window)
        )
    return out


def code_density(cache: CodeCacheLike, hook: str) -> Float[np.ndarray, "n_groups num_codes"]:
    """Each code's firing frequency: the fraction of cached tokens at which it fires."""
    n_groups, _, num_codes = cache.shape_of(hook)
    counts = np.asarray(cache.index(hook).counts(), dtype=np.float64)
    return counts.reshape(n_groups, num_codes) / max(cache.n_tokens, 1)


@dataclass(frozen=True)
class DensityHistogram:
    """Histogram of log10 firing density over the live codes, as SAE dashboards plot it."""

    counts: list[int]
    edges: list[float]
    """log10(density) bin edges, len(counts) + 1 of them."""
    dead: int
    """Codes that never fire (left out of the histogram: log10(0) is -inf)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def density_histogram(density: Float[np.ndarray, "..."], bins: int = 50) -> DensityHistogram:
    """`bins` equal bins of log10(density) from the lowest live code's decade up to 0 (a code
    firing on every token)."""
    if isinstance(bins, bool) or bins < 1:
        raise ValueError(f"bins must be an integer >= 1, got {bins!r}.")
    density = np.asarray(density, dtype=np.float64).ravel()
    live = density[density > 0]
    if live.size == 0:
        return DensityHistogram(counts=[0] * bins, edges=[], dead=int(density.size))
    log = np.log10(live)
    low = float(np.floor(log.min()))
    high = max(0.0, float(np.ceil(log.max())))
    if low == high:
        low -= 1.0
    counts, edges = np.histogram(log, bins=bins, range=(low, high))
    return DensityHistogram(
        counts=counts.tolist(), edges=edges.tolist(), dead=int(density.size - live.size)
    )


@dataclass(frozen=True)
class CoFiring:
    """Another code's overlap with the queried one: Jaccard index of their firing positions,
    the positions they share, and the other code's firings."""

    hook: str
    group: int
    code: int
    jaccard: float
    intersection: int
    count: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def cofiring(
    cache: CodeCacheLike, hook: str, code: int, group: int = 0, top: int = 10
) -> list[CoFiring]:
    """The codes (of every codebook and group in the cache) whose firing positions overlap
    most with this code's, by Jaccard index |A & B| / |A | B|, best first (ties: the larger
    overlap, then hook order, group, code). Per codebook, one bincount of its ids at this
    code's positions gives every intersection; unions follow from the firing counts."""
    if isinstance(top, bool) or top < 1:
        raise ValueError(f"top must be an integer >= 1, got {top!r}.")
    positions = _positions(cache, hook, code, group)
    if positions.size == 0:
        return []
    rows: list[tuple[float, int, int, int, int, int]] = []
    hooks = list(cache.hooks)
    for hook_index, name in enumerate(hooks):
        _, _, num_codes = cache.shape_of(name)
        shared = token_counts_at(cache, name, positions).reshape(-1).numpy()
        counts = np.asarray(cache.index(name).counts(), dtype=np.int64).reshape(-1)
        if name == hook:
            shared[group * num_codes + code] = 0  # not its own co-firing code
        unit = np.flatnonzero(shared)
        jaccard = shared[unit] / (positions.size + counts[unit] - shared[unit])
        rows.extend(
            zip(
                (-jaccard).tolist(),
                (-shared[unit]).tolist(),
                [hook_index] * unit.size,
                (unit // num_codes).tolist(),
                (unit % num_codes).tolist(),
                counts[unit].tolist(),
                strict=True,
            )
        )
    rows.sort()
    return [
        CoFiring(
            hook=hooks[h], group=g, code=c, jaccard=-negative, intersection=-inter, count=count
        )
        for negative, inter, h, g, c, count in rows[:top]
    ]


@dataclass(frozen=True)
class TopicCode:
    """A code that fires on at least `min_fraction` of some sequences' tokens: those sequences
    and the fraction of each one's tokens it fires on (highest first)."""

    hook: str
    group: int
    code: int
    seqs: list[int] = field(default_factory=list)
    fractions: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def topic_codes(cache: CodeCacheLike, hook: str, min_fraction: float = 0.2) -> list[TopicCode]:
    """Codes firing on at least `min_fraction` of one document's (sequence's) tokens, as the
    reference's topic browser finds them, ordered by their highest fraction (ties: more such
    sequences, then group, code).

    One pass over the codebook's inverted index: its positions are sorted by (group, code),
    then by position, so (code, sequence) runs are contiguous and are counted without a sort.
    """
    if not 0.0 < min_fraction <= 1.0:
        raise ValueError(f"min_fraction must be in (0, 1], got {min_fraction!r}.")
    index = cache.index(hook)
    n_groups, _, num_codes = cache.shape_of(hook)
    offsets = np.asarray(index.offsets, dtype=np.int64)
    positions = np.asarray(index.positions, dtype=np.int64)
    if positions.size == 0:
        return []
    unit = np.repeat(np.arange(n_groups * num_codes, dtype=np.int64), np.diff(offsets))
    key = unit * cache.n_seq + positions // cache.seq_len
    starts = np.flatnonzero(np.r_[True, key[1:] != key[:-1]])
    run_key = key[starts]
    fraction = np.diff(np.r_[starts, key.size]) / cache.seq_len
    keep = fraction >= min_fraction
    run_key, fraction = run_key[keep], fraction[keep]
    run_unit, run_seq = run_key // cache.n_seq, run_key % cache.n_seq
    found: dict[int, list[tuple[float, int]]] = {}
    for u, s, f in zip(run_unit.tolist(), run_seq.tolist(), fraction.tolist(), strict=True):
        found.setdefault(u, []).append((f, s))
    out = []
    for u, runs in found.items():
        runs.sort(key=lambda run: (-run[0], run[1]))
        out.append(
            TopicCode(
                hook=hook,
                group=u // num_codes,
                code=u % num_codes,
                seqs=[s for _, s in runs],
                fractions=[f for f, _ in runs],
            )
        )
    out.sort(key=lambda t: (-t.fractions[0], -len(t.seqs), t.group, t.code))
    return out
