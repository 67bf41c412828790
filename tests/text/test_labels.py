"""Ground-truth labels of the LM demo: month regex, VADER negative words, one row per article."""

import re

import pytest
import torch

from tl_codebook.text.labels import (
    MONTH_REGEX,
    document_rows,
    negative_emotion_regex,
    vader_lexicon,
)


def test_month_regex_finds_months_and_only_the_dated_may():
    text = "In January and on 5 May, May 12 and you may go; March was hot. Marching. Junebug."
    assert re.findall(MONTH_REGEX, text) == ["January", "May", "May", "March"]


def test_vader_lexicon_ratings_are_the_published_ones():
    lexicon = vader_lexicon()
    # three entries of vader_lexicon.txt (mean ratings of ten raters)
    assert lexicon["terrible"] == pytest.approx(-2.1)
    assert lexicon["war"] == pytest.approx(-2.9)
    assert lexicon["good"] == pytest.approx(1.9)
    assert all(word.isalpha() for word in lexicon)  # emoticons left out


def test_negative_regex_matches_strongly_negative_whole_words_only():
    regex = re.compile(negative_emotion_regex())
    text = "The war was a Terrible disaster; they were furious. A good day, warm and sunny."
    assert [m.lower() for m in regex.findall(text)] == ["war", "terrible", "disaster", "furious"]
    assert negative_emotion_regex(-3.5) != negative_emotion_regex()


class WordTokenizer:
    """One token per word; BOS is id 0."""

    bos_token_id = 0

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [len(word) for word in text.split()]}


def test_document_rows_take_bos_and_the_first_tokens_and_skip_short_documents():
    texts = ["a bb ccc dddd", "a b", "eeeee ff g hh ii"]
    rows, kept = document_rows(texts, WordTokenizer(), seq_len=4)
    assert kept == [0, 2]
    assert torch.equal(rows, torch.tensor([[0, 1, 2, 3], [0, 5, 2, 1]]))
    rows, kept = document_rows(texts, WordTokenizer(), seq_len=4, max_docs=1)
    assert kept == [0]


def test_document_rows_refuse_what_cannot_make_a_row():
    with pytest.raises(ValueError, match="seq_len must be >= 2"):
        document_rows(["a b"], WordTokenizer(), seq_len=1)
    with pytest.raises(ValueError, match="No document has the 9 tokens"):
        document_rows(["a b"], WordTokenizer(), seq_len=10)
