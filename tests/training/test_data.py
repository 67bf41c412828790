import os

os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"

import json  # noqa: E402

import datasets  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from tokenizers import Regex, Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import PreTrainedTokenizerFast  # noqa: E402

from tl_codebook.training.data import pack_token_sequences, token_batches  # noqa: E402

BOS, EOS = 0, 1
ALPHABET = "abcdefghijklmnopqrstuvwxyz "


@pytest.fixture(scope="module")
def char_tokenizer():
    """Character-level tokenizer built offline: <bos>=0, <eos>=1, <unk>=2, 'a'=3, 'b'=4, ..."""
    vocab = {"<bos>": BOS, "<eos>": EOS, "<unk>": 2}
    vocab.update({char: 3 + i for i, char in enumerate(ALPHABET)})
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>"
    )


def ids(text: str) -> list[int]:
    return [3 + ALPHABET.index(char) for char in text]


def rows(chunks) -> list[list[int]]:
    return [chunk.tolist() for chunk in chunks]


def test_pack_cuts_joined_documents_into_bos_rows():
    documents = [[10, 11, 12], [20, 21], [], [30, 31, 32, 33, 34]]
    packed = pack_token_sequences(documents, seq_len=4, bos_token_id=BOS, separator_token_id=EOS)
    # stream: 10 11 12 EOS 20 21 EOS 30 31 32 33 34 -> pieces of 3, tail (34... none) dropped
    assert rows(packed) == [
        [BOS, 10, 11, 12],
        [BOS, EOS, 20, 21],
        [BOS, EOS, 30, 31],
        [BOS, 32, 33, 34],
    ]


def test_pack_without_bos_or_separator_is_plain_chunking():
    documents = [torch.tensor([1, 2, 3]), torch.tensor([4, 5, 6, 7])]
    packed = pack_token_sequences(documents, seq_len=3, prepend_bos=False)
    assert rows(packed) == [[1, 2, 3], [4, 5, 6]]  # 7 is the dropped tail


def test_pack_matches_transformer_lens_tokenize_and_concatenate(char_tokenizer):
    from transformer_lens.utilities import tokenize_and_concatenate

    texts = ["hello world", "codebook", "features are sparse", "abc"]
    theirs = tokenize_and_concatenate(
        datasets.Dataset.from_dict({"text": texts}), char_tokenizer, max_length=8, num_proc=None
    )["tokens"]
    ours = pack_token_sequences(
        [ids(text) for text in texts], seq_len=8, bos_token_id=BOS, separator_token_id=EOS
    )
    assert rows(ours) == [row.tolist() for row in theirs]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"seq_len": 0, "prepend_bos": False}, "seq_len must be >= 1, got 0"),
        ({"seq_len": 1, "bos_token_id": 0}, "seq_len must be >= 2 to hold BOS"),
        ({"seq_len": 4}, "prepend_bos=True needs a BOS token"),
    ],
)
def test_pack_bad_arguments_raise_at_once(kwargs, message):
    with pytest.raises(ValueError, match=message):
        pack_token_sequences([[1, 2]], **kwargs)


def test_pack_rejects_float_and_2d_sequences():
    with pytest.raises(ValueError, match="must hold integers, got dtype torch.float32"):
        list(pack_token_sequences([torch.ones(3)], 2, prepend_bos=False))
    with pytest.raises(ValueError, match=r"must be 1-D, got shape \(2, 2\)"):
        list(pack_token_sequences([[[1, 2], [3, 4]]], 2, prepend_bos=False))


def test_text_dataset_is_tokenized_and_batched(char_tokenizer):
    dataset = datasets.Dataset.from_dict({"text": ["abc", "", None, "de", "fghijkl"]})
    stream = token_batches(dataset, batch_size=2, seq_len=4, tokenizer=char_tokenizer)
    # 14 tokens: 4 rows of BOS + 3, then "kl" is the dropped tail
    stream_ids = ids("abc") + [EOS] + ids("de") + [EOS] + ids("fghijkl")
    expected = [[BOS, *stream_ids[i : i + 3]] for i in range(0, 12, 3)]
    batch = next(stream)
    assert batch.dtype == torch.long
    assert batch.tolist() == expected[:2]
    assert next(stream).tolist() == expected[2:]
    assert list(stream) == []


@pytest.mark.parametrize("column", ["tokens", "input_ids"])
def test_pretokenized_dataset_needs_no_tokenizer(column):
    dataset = datasets.Dataset.from_dict({column: [[5, 6, 7], [8, 9]], "meta": ["x", "y"]})
    stream = token_batches(
        dataset, batch_size=1, seq_len=3, bos_token_id=BOS, separator_token_id=EOS
    )
    assert [batch.tolist() for batch in stream] == [[[BOS, 5, 6]], [[BOS, 7, EOS]], [[BOS, 8, 9]]]


def test_iterable_dataset_and_torch_format_work_the_same():
    dataset = datasets.Dataset.from_dict({"tokens": [[1, 2, 3, 4], [5, 6, 7, 8]]})
    expected = [[[1, 2], [3, 4]], [[5, 6], [7, 8]]]
    for source in (dataset.to_iterable_dataset(), dataset.with_format("torch")):
        stream = token_batches(source, batch_size=2, seq_len=2, prepend_bos=False)
        assert [batch.tolist() for batch in stream] == expected


@pytest.mark.parametrize("suffix", [".txt", ".jsonl", ".json", ".parquet"])
def test_local_files(tmp_path, char_tokenizer, suffix):
    texts = ["ab", "cde", "fg"]
    path = tmp_path / f"corpus{suffix}"
    if suffix == ".txt":
        path.write_text("\n".join(texts) + "\n")
    elif suffix == ".parquet":
        datasets.Dataset.from_dict({"text": texts}).to_parquet(str(path))
    else:
        path.write_text(
            "".join(json.dumps({"text": text, "id": i}) + "\n" for i, text in enumerate(texts))
        )
    stream = token_batches(path, batch_size=3, seq_len=3, tokenizer=char_tokenizer)
    stream_ids = ids("ab") + [EOS] + ids("cde") + [EOS] + ids("fg")
    assert next(stream).tolist() == [[BOS, *stream_ids[i : i + 2]] for i in (0, 2, 4)]


def test_local_file_with_unknown_suffix_raises(tmp_path):
    path = tmp_path / "corpus.csv"
    path.write_text("text\nab\n")
    with pytest.raises(ValueError, match=r"corpus.csv.*must end in one of \['.json', "):
        token_batches(path, batch_size=1, seq_len=2, prepend_bos=False)


def test_token_stream_with_fixed_length_rows_is_used_as_is():
    def fsm_samples():  # e.g. a TokFSM generator: yields model-ready rows, sometimes 2-D
        yield torch.tensor([0, 5, 6, 7])
        yield torch.tensor([[0, 8, 9, 9], [0, 1, 1, 2]])
        yield [0, 3, 3, 3]

    stream = token_batches(fsm_samples(), batch_size=2, seq_len=4, pack=False)
    assert [batch.tolist() for batch in stream] == [
        [[0, 5, 6, 7], [0, 8, 9, 9]],
        [[0, 1, 1, 2], [0, 3, 3, 3]],
    ]
    with pytest.raises(ValueError, match="pack=False every sequence must have seq_len=4"):
        next(token_batches([[1, 2]], batch_size=1, seq_len=4, pack=False))


def test_a_fresh_stream_gives_the_same_batches_again(char_tokenizer):
    # what a resumed run relies on: it skips the batches its checkpoint consumed
    texts = [ALPHABET[i : i + 1 + i % 5] for i in range(20)]
    dataset = datasets.Dataset.from_dict({"text": texts})
    first = list(token_batches(dataset, batch_size=2, seq_len=5, tokenizer=char_tokenizer))
    again = list(token_batches(dataset, batch_size=2, seq_len=5, tokenizer=char_tokenizer))
    assert len(first) >= 3
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))


def test_repeat_starts_the_source_again():
    data = [[1, 2, 3, 4, 5, 6]]
    stream = token_batches(data, batch_size=2, seq_len=2, prepend_bos=False, repeat=True)
    batches = [next(stream).tolist() for _ in range(4)]
    assert batches == [[[1, 2], [3, 4]], [[5, 6], [1, 2]], [[3, 4], [5, 6]], [[1, 2], [3, 4]]]
    with pytest.raises(ValueError, match="repeat=True needs a source that can be iterated"):
        token_batches(iter(data), batch_size=1, seq_len=2, prepend_bos=False, repeat=True)


def test_dataset_without_text_column_lists_its_columns(char_tokenizer):
    dataset = datasets.Dataset.from_dict({"content": ["ab"], "label": [1]})
    with pytest.raises(
        ValueError, match=r"no text column 'text'.*columns are \['content', 'label'\]"
    ):
        token_batches(dataset, 1, 2, tokenizer=char_tokenizer)
    with pytest.raises(ValueError, match="column 'content' holds text: pass tokenizer="):
        token_batches(dataset, 1, 2, text_column="content", bos_token_id=BOS)


def test_dataset_empty_after_dropping_empty_documents_raises(char_tokenizer):
    dataset = datasets.Dataset.from_dict({"text": ["", None, ""]})
    stream = token_batches(dataset, batch_size=1, seq_len=2, tokenizer=char_tokenizer)
    with pytest.raises(ValueError, match="does not fill one batch of 1 rows of 2 tokens"):
        next(stream)
    with pytest.raises(ValueError, match="holds no row of 2 tokens"):
        next(token_batches(dataset, 1, 2, tokenizer=char_tokenizer, repeat=True))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"seq_len": 0}, "seq_len must be >= 1, got 0"),
        ({"batch_size": 0}, "batch_size must be >= 1, got 0"),
        ({"prepend_bos": True}, "prepend_bos=True needs a BOS token"),
    ],
)
def test_token_batches_bad_arguments_raise(kwargs, message):
    options = {"batch_size": 1, "seq_len": 2, "prepend_bos": False, **kwargs}
    with pytest.raises(ValueError, match=message):
        token_batches([[1, 2]], **options)


def test_hub_names_go_to_load_dataset_streaming(monkeypatch):
    calls = []

    def fake_load_dataset(path, name=None, split=None, streaming=False, **kwargs):
        calls.append((path, name, split, streaming))
        return datasets.Dataset.from_dict({"tokens": [[1, 2]]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    stream = token_batches(
        "someone/corpus", 1, 2, prepend_bos=False, split="validation", dataset_config="en"
    )
    assert next(stream).tolist() == [[1, 2]]
    assert calls == [("someone/corpus", "en", "validation", True)]


@pytest.mark.parametrize(("text", "message"), [("", "is empty"), ("\n", "holds no records")])
def test_empty_jsonl_file_is_a_clear_error(tmp_path, text, message):
    path = tmp_path / "data.jsonl"
    path.write_text(text)
    with pytest.raises(ValueError, match=f"file '.*data.jsonl' {message}"):
        next(token_batches(path, 1, 2, prepend_bos=False))
