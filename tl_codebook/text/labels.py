"""Ground truth for concept codes in real text: which cached tokens are a month, a strongly
negative word, or part of an article on a given topic.

Months and emotions are word-level concepts, labelled by a regular expression over the decoded
text (`CodeCache.search(regex=...)` maps characters to tokens). Topics are document-level: every
token of an article carries the article's topic, so the code cache is built from one row per
article (`document_rows`) rather than from packed rows that mix articles.

The emotion lexicon is VADER's (`vaderSentiment`, MIT licence): about 7,500 words and emoticons
rated by ten people from -4 (extremely negative) to +4. Its file is read from the installed wheel
without importing the package (which imports `requests` for nothing we use).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor

from tl_codebook.files import package_data_dir

MONTHS = (
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
)

MONTH_REGEX = (
    r"\b(?:January|February|March|April|June|July|August|September|October|November|December"
    r"|May(?= \d)|(?<=\d )May)\b"
)
"""A month's name, capitalised. "May" counts only next to a day number ("May 5", "5 May"): as a
word alone it is mostly the verb, which no month code should be blamed for missing."""

VADER_REQUIREMENT = "vaderSentiment==3.3.2"
NEGATIVE_THRESHOLD = -2.0
"""A word is "strongly negative" when its mean VADER rating is at or below this (of -4..+4)."""


def vader_lexicon() -> dict[str, float]:
    """VADER's words (letters only: its emoticons are left out) and their mean ratings.

    Raises:
        ValueError: if vaderSentiment is not installed (the pip command is named).
    """
    path = package_data_dir("vaderSentiment", VADER_REQUIREMENT) / "vader_lexicon.txt"
    lexicon: dict[str, float] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        parts = line.split("\t")
        if len(parts) >= 2 and parts[0].isalpha():
            lexicon[parts[0].lower()] = float(parts[1])
    return lexicon


def negative_emotion_regex(threshold: float = NEGATIVE_THRESHOLD) -> str:
    """A case-insensitive regex matching any VADER word rated <= `threshold` (whole words)."""
    words = sorted(
        (word for word, rating in vader_lexicon().items() if rating <= threshold),
        key=lambda w: (-len(w), w),  # longest first: the alternation then prefers whole words
    )
    if not words:
        raise ValueError(f"No VADER word is rated <= {threshold}; raise the threshold.")
    return r"(?i)\b(?:" + "|".join(re.escape(w) for w in words) + r")\b"


def document_rows(
    texts: Sequence[str], tokenizer: Any, seq_len: int, max_docs: int | None = None
) -> tuple[Int[Tensor, "n_docs seq_len"], list[int]]:
    """One row per document: BOS and the document's first `seq_len - 1` tokens.

    Documents shorter than that are left out (a padded row would label padding with a topic).

    Returns:
        The rows and, for each, the index of its document in `texts`.

    Raises:
        ValueError: for `seq_len` < 2, a tokenizer without a BOS token, or no document long
            enough.
    """
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2 (BOS and one token), got {seq_len}.")
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        raise ValueError("document_rows needs a tokenizer with a bos_token_id.")
    rows: list[Tensor] = []
    kept: list[int] = []
    for index, text in enumerate(texts):
        if max_docs is not None and len(rows) >= max_docs:
            break
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][: seq_len - 1]
        if len(ids) == seq_len - 1:
            rows.append(torch.tensor([bos, *ids], dtype=torch.long))
            kept.append(index)
    if not rows:
        raise ValueError(
            f"No document has the {seq_len - 1} tokens a row of seq_len {seq_len} needs."
        )
    return torch.stack(rows), kept


__all__ = [
    "MONTHS",
    "MONTH_REGEX",
    "NEGATIVE_THRESHOLD",
    "VADER_REQUIREMENT",
    "document_rows",
    "negative_emotion_regex",
    "vader_lexicon",
]
