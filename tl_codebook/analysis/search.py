"""Code search over a code cache: which codes fire where a token set, a regex or a mask holds.

Positions are labelled once (`token_mask`, `regex_mask`, or a given mask); then every codebook
is scored by one bincount over the (group, code) ids at the labelled positions (the true
positives), while each code's firings come from the cache's inverted index, so a query costs
O(labelled tokens x k) per codebook, never a Python loop over codes or tokens. Precision,
recall and F1 are `analysis.concepts`' (the one implementation the TokFSM and SAE scores use).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from jaxtyping import Bool, Int, Shaped
from torch import Tensor

from tl_codebook.analysis.concepts import binary_concept_scores, code_token_counts


@runtime_checkable
class CodeCacheLike(Protocol):
    """What the queries read from a cache (`CodeCache` has all of it; tests use small arrays)."""

    @property
    def hooks(self) -> list[str]: ...
    @property
    def n_seq(self) -> int: ...
    @property
    def seq_len(self) -> int: ...
    @property
    def n_tokens(self) -> int: ...
    @property
    def tokens(self) -> Any: ...
    @property
    def vocab(self) -> list[str]: ...
    def codes(self, hook: str) -> np.ndarray: ...
    def scores(self, hook: str) -> np.ndarray | None: ...
    def index(self, hook: str) -> Any: ...
    def shape_of(self, hook: str) -> tuple[int, int, int]: ...
    def check_code(self, hook: str, code: int, group: int = 0) -> None: ...
    def text_offsets(self) -> tuple[str, np.ndarray]: ...


@dataclass(frozen=True)
class CodeMatch:
    """One code's agreement with the searched positions.

    precision = true_positives / count, recall = true_positives / labelled positions, f1 their
    harmonic mean; count is the code's firings over the whole cache (tokens where it is among
    the k ids of its group).
    """

    hook: str
    """The codebook's hook name."""
    group: int
    """The codebook group the code belongs to."""
    code: int
    """The code id within its group."""
    precision: float
    """Of the code's firings, the fraction on labelled positions."""
    recall: float
    """Of the labelled positions, the fraction where the code fires."""
    f1: float
    """The harmonic mean of precision and recall."""
    count: int
    """The code's firings over the whole cache."""
    true_positives: int
    """Its firings on labelled positions."""

    def to_dict(self) -> dict[str, Any]:
        """The match as a plain JSON-ready dict (field name -> value)."""
        return asdict(self)


def flat_codes(cache: CodeCacheLike, hook: str) -> np.ndarray:
    """The codes of `hook` as `[n_tokens, n_groups, k]` (a view of the memory map, no copy)."""
    codes = cache.codes(hook)
    return codes.reshape(-1, *codes.shape[-2:])


def token_counts_at(
    cache: CodeCacheLike, hook: str, flat_positions: Int[np.ndarray, " positions"]
) -> Int[Tensor, "n_groups num_codes"]:
    """For every (group, code) of `hook`, how many of the given distinct token positions it
    fires at: one gather of those positions' ids and one bincount (`code_token_counts`)."""
    _, _, num_codes = cache.shape_of(hook)
    ids = np.asarray(flat_codes(cache, hook)[flat_positions], dtype=np.int64)
    return code_token_counts(torch.from_numpy(ids), num_codes)


def _as_mask(cache: CodeCacheLike, mask: Any) -> np.ndarray:
    if isinstance(mask, Tensor):
        mask = mask.detach().cpu().numpy()
    mask = np.asarray(mask)
    expected = (cache.n_seq, cache.seq_len)
    if mask.shape != expected:
        raise ValueError(
            f"mask has shape {tuple(mask.shape)} but the cache holds tokens of shape "
            f"{expected} (n_seq, seq_len); pass one boolean per cached token."
        )
    if mask.dtype != np.bool_:
        raise TypeError(f"mask must be boolean, got dtype {mask.dtype}.")
    return mask


def token_mask(
    cache: CodeCacheLike, token_ids: int | Iterable[int] | Tensor | np.ndarray
) -> Bool[np.ndarray, "n_seq seq_len"]:
    """True at every cached position whose token id is one of `token_ids`."""
    if isinstance(token_ids, Tensor):
        token_ids = token_ids.detach().cpu().numpy()
    ids = np.atleast_1d(np.asarray(token_ids if not isinstance(token_ids, int) else [token_ids]))
    if ids.size == 0:
        raise ValueError("tokens is empty: give at least one token id to search for.")
    if not np.issubdtype(ids.dtype, np.integer):
        raise TypeError(f"tokens must be integer token ids, got dtype {ids.dtype}.")
    vocab_size = len(cache.vocab)
    bad = ids[(ids < 0) | (ids >= vocab_size)]
    if bad.size:
        raise ValueError(
            f"token ids must be in [0, {vocab_size - 1}] (the cache's vocab), got "
            f"{sorted(set(bad.tolist()))[:10]}."
        )
    return np.isin(np.asarray(cache.tokens), ids.ravel())


def compile_regex(pattern: str | re.Pattern[str]) -> re.Pattern[str]:
    """`pattern` compiled, or a ValueError naming the pattern and why it does not compile."""
    if isinstance(pattern, re.Pattern):
        return pattern
    try:
        return re.compile(pattern)
    except re.error as err:
        raise ValueError(f"regex {pattern!r} does not compile: {err}.") from None


def regex_mask(
    cache: CodeCacheLike, pattern: str | re.Pattern[str]
) -> Bool[np.ndarray, "n_seq seq_len"]:
    """True at every token covered by a match of `pattern` over the decoded text.

    Each sequence's text (its tokens' strings from `vocab`, joined) is searched on its own, so
    a match never spans two sequences and `^`/`$` anchor at a sequence's ends. With a capture
    group the span of group 1 counts, else the whole match; a span labels every token it
    overlaps (a match over several tokens labels all of them). Empty spans label nothing.
    """
    regex = compile_regex(pattern)
    text, starts = cache.text_offsets()
    starts = np.asarray(starts)
    seq_len, n_tokens = cache.seq_len, cache.n_tokens
    group = 1 if regex.groups >= 1 else 0
    begins: list[int] = []
    ends: list[int] = []
    for seq in range(cache.n_seq):  # one regex run per sequence (the engine loops over matches)
        base = int(starts[seq * seq_len])
        for match in regex.finditer(text[base : int(starts[(seq + 1) * seq_len])]):
            begin, end = match.span(group)
            if end > begin:  # an empty span, or a group that did not take part, covers nothing
                begins.append(base + begin)
                ends.append(base + end)
    if not begins:
        return np.zeros((cache.n_seq, seq_len), dtype=bool)
    # the token holding a span's first character, and the one holding its last
    first = np.searchsorted(starts, np.asarray(begins), side="right") - 1
    last = np.searchsorted(starts, np.asarray(ends), side="left") - 1
    covered = np.bincount(first, minlength=n_tokens + 1) - np.bincount(
        last + 1, minlength=n_tokens + 1
    )
    return (np.cumsum(covered)[:n_tokens] > 0).reshape(cache.n_seq, seq_len)


def _hooks(cache: CodeCacheLike, hook: str | Sequence[str] | None) -> list[str]:
    if hook is None:
        return list(cache.hooks)
    chosen = [hook] if isinstance(hook, str) else list(hook)
    for name in chosen:
        cache.shape_of(name)  # an unknown hook raises, naming the cache's hooks
    return chosen


def search(
    cache: CodeCacheLike,
    hook: str | Sequence[str] | None = None,
    *,
    tokens: int | Iterable[int] | Tensor | np.ndarray | None = None,
    regex: str | re.Pattern[str] | None = None,
    mask: Shaped[Tensor, "..."] | Shaped[np.ndarray, "..."] | None = None,
    min_precision: float = 0.0,
    min_recall: float = 0.0,
    top: int | None = 20,
) -> list[CodeMatch]:
    """The codes that fire where the query holds, best F1 first (ties: more firings first, then
    hook order, group, code), over every codebook (`hook=None`) or the named ones.

    Exactly one of `tokens` (token ids), `regex` (over the decoded text, see `regex_mask`) or
    `mask` (`[n_seq, seq_len]` booleans) labels the positions. Only codes firing on at least
    one labelled position are listed; `min_precision`/`min_recall` drop weaker ones and `top`
    keeps the best `top` (None: all). No labelled position gives an empty list.
    """
    given = {"tokens": tokens, "regex": regex, "mask": mask}
    chosen = [name for name, value in given.items() if value is not None]
    if len(chosen) != 1:
        raise ValueError(
            f"search takes exactly one of tokens=, regex= or mask=; got "
            f"{', '.join(chosen) if chosen else 'none'}."
        )
    for name, value in (("min_precision", min_precision), ("min_recall", min_recall)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {value!r}.")
    if top is not None and (isinstance(top, bool) or top < 1):
        raise ValueError(f"top must be an integer >= 1 or None, got {top!r}.")
    hooks = _hooks(cache, hook)
    if mask is not None:
        labelled = _as_mask(cache, mask)
    elif regex is not None:
        labelled = regex_mask(cache, regex)
    else:
        labelled = token_mask(cache, tokens)  # type: ignore[arg-type]
    positions = np.flatnonzero(labelled.reshape(-1))
    if positions.size == 0:
        return []
    columns: dict[str, list[np.ndarray]] = {
        key: [] for key in ("hook", "group", "code", "precision", "recall", "f1", "count", "tp")
    }
    for hook_index, name in enumerate(hooks):
        n_groups, _, num_codes = cache.shape_of(name)
        counts = torch.from_numpy(np.asarray(cache.index(name).counts(), dtype=np.int64))
        true_positives = token_counts_at(cache, name, positions)
        scores = binary_concept_scores(
            true_positives, counts.reshape(n_groups, num_codes), positions.size, cache.n_tokens
        )
        precision = scores.precision[..., 1].reshape(-1).numpy()
        recall = scores.recall[..., 1].reshape(-1).numpy()
        keep = (true_positives.reshape(-1).numpy() > 0) & (precision >= min_precision)
        keep &= recall >= min_recall
        unit = np.flatnonzero(keep)
        columns["hook"].append(np.full(unit.size, hook_index))
        columns["group"].append(unit // num_codes)
        columns["code"].append(unit % num_codes)
        columns["precision"].append(precision[unit])
        columns["recall"].append(recall[unit])
        columns["f1"].append(scores.f1()[..., 1].reshape(-1).numpy()[unit])
        columns["count"].append(counts.reshape(-1).numpy()[unit])
        columns["tp"].append(true_positives.reshape(-1).numpy()[unit])
    table = {key: np.concatenate(parts) for key, parts in columns.items()}
    # lexsort: the last key is the primary one
    order = np.lexsort(
        (table["code"], table["group"], table["hook"], -table["count"], -table["f1"])
    )
    if top is not None:
        order = order[:top]
    return [
        CodeMatch(
            hook=hooks[int(table["hook"][i])],
            group=int(table["group"][i]),
            code=int(table["code"][i]),
            precision=float(table["precision"][i]),
            recall=float(table["recall"][i]),
            f1=float(table["f1"][i]),
            count=int(table["count"][i]),
            true_positives=int(table["tp"][i]),
        )
        for i in order
    ]
