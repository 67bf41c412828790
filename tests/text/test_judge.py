"""The steering judge: bigram ratios by hand, the BBC topic classifier on held-out articles and
hand-written texts, and verdicts for fluent, looping, high-loss and off-topic generations."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest

from tl_codebook.corpora import BBC_TOPICS, corpus_dataset
from tl_codebook.text.judge import (
    TOPIC_WORDS,
    TopicClassifier,
    Verdict,
    check_topic,
    distinct_bigram_ratio,
    has_topic_word,
    judge_generations,
    rate_difference,
    success_rate,
    summarize,
    tokens,
)

SPORTS = (
    "The striker scored twice as the club won the league title in the final minutes of the match."
)

EXAMPLES = {
    "sports": SPORTS,
    "business": (
        "Shares fell after the bank reported lower quarterly profits and the chief executive "
        "warned of weaker sales."
    ),
    "politics": (
        "The prime minister faced MPs in parliament as the opposition party attacked the "
        "government's plans ahead of the general election."
    ),
    "tech": (
        "The new mobile phone software lets users browse the internet over broadband, and the "
        "firm says its computer chips are faster."
    ),
    "entertainment": (
        "The actress won an Oscar for best film at the awards ceremony, and the director's new "
        "movie topped the box office."
    ),
}


@pytest.fixture(scope="module")
def classifier() -> TopicClassifier:
    start = time.perf_counter()
    fitted = TopicClassifier.for_bbc_news("train")
    print(f"fit on BBC train in {time.perf_counter() - start:.1f} s")
    return fitted


# -- distinct bigram ratio ------------------------------------------------------------------


def test_bigram_ratio_known_answers():
    assert distinct_bigram_ratio("a b a b") == pytest.approx(2 / 3)
    assert distinct_bigram_ratio("Sony Sony Sony Sony") == pytest.approx(1 / 3)
    assert distinct_bigram_ratio("Sony sony SONY") == pytest.approx(1 / 2)  # lowercased
    assert distinct_bigram_ratio("hello") == 0.0
    assert distinct_bigram_ratio("") == 0.0
    assert distinct_bigram_ratio("the cat sat") == 1.0


def test_punctuation_is_a_token():
    # "wow! wow! wow!" -> wow ! wow ! wow ! -> (wow,!) (!,wow) (wow,!) (!,wow) (wow,!): 2 of 5
    assert tokens("Wow! wow! wow!") == ["wow", "!", "wow", "!", "wow", "!"]
    assert distinct_bigram_ratio("Wow! wow! wow!") == pytest.approx(2 / 5)
    # "hi." -> hi . : one bigram, distinct
    assert distinct_bigram_ratio("hi.") == 1.0


# -- topic classifier -----------------------------------------------------------------------


def test_classifier_accuracy_on_held_out_bbc(classifier):
    test = corpus_dataset("bbc-news", "test")
    accuracy = classifier.accuracy(list(test["text"]), list(test["label"]))
    print(f"BBC test accuracy {accuracy:.4f} on {len(test)} articles")
    assert accuracy >= 0.9


def test_classifier_topics_and_probabilities(classifier):
    assert classifier.topics == sorted(BBC_TOPICS)
    probs = classifier.probabilities([SPORTS, "The bank cut interest rates."])
    assert probs.shape == (2, 5)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0)
    assert classifier.topics[int(probs[0].argmax())] == "sports"
    assert classifier.predict([]) == []
    assert classifier.probabilities([]).shape == (0, 5)


def test_hand_written_texts_get_their_topic(classifier):
    topics = list(EXAMPLES)
    assert sorted(topics) == sorted(BBC_TOPICS)
    assert classifier.predict([EXAMPLES[t] for t in topics]) == topics


def test_fit_is_deterministic():
    texts = ["the match and the goal", "the bank and the shares"] * 3
    labels = ["sports", "business"] * 3
    a = TopicClassifier.fit(texts, labels).probabilities(["a goal in the match"])
    b = TopicClassifier.fit(texts, labels).probabilities(["a goal in the match"])
    np.testing.assert_array_equal(a, b)


def test_fit_checks_its_inputs():
    with pytest.raises(ValueError, match="2 texts but 1 labels"):
        TopicClassifier.fit(["a", "b"], ["sports"])
    with pytest.raises(ValueError, match="at least 2 labels"):
        TopicClassifier.fit(["a b", "b c"], ["sports", "sports"])


# -- judge ----------------------------------------------------------------------------------


def test_fluent_on_topic_text_is_steered(classifier):
    (verdict,) = judge_generations([SPORTS], ["sports"], [1.0], 1.0, classifier)
    assert verdict.on_topic and verdict.predicted == "sports"
    assert verdict.fluent and verdict.steered
    assert verdict.loss_ratio == 1.0
    assert verdict.bigram_ratio == 1.0


def test_high_loss_is_not_fluent(classifier):
    (verdict,) = judge_generations([SPORTS], ["sports"], [2.0], 1.0, classifier)
    assert verdict.on_topic
    assert verdict.loss_ratio == 2.0
    assert not verdict.fluent and not verdict.steered


def test_loss_ratio_boundary_is_inclusive(classifier):
    (at,) = judge_generations([SPORTS], ["sports"], [3.0], 2.0, classifier)
    (above,) = judge_generations([SPORTS], ["sports"], [3.02], 2.0, classifier)
    assert at.fluent and not above.fluent


def test_nan_loss_is_not_fluent(classifier):
    (verdict,) = judge_generations([SPORTS], ["sports"], [math.nan], 1.0, classifier)
    assert not verdict.fluent and not verdict.steered


def test_repetition_is_never_steered(classifier):
    (verdict,) = judge_generations(
        ["Sony Sony Sony Sony Sony Sony"], ["tech"], [1.0], 1.0, classifier
    )
    assert verdict.bigram_ratio == pytest.approx(0.2)
    assert not verdict.fluent and not verdict.steered


def test_wrong_topic_is_not_steered(classifier):
    (verdict,) = judge_generations([EXAMPLES["business"]], ["sports"], [1.0], 1.0, classifier)
    assert verdict.predicted == "business"
    assert verdict.fluent and not verdict.on_topic and not verdict.steered


def test_topic_word():
    assert has_topic_word("The sport was great", "sports")
    assert not has_topic_word("The sport was great", "politics")
    assert has_topic_word("POLITICAL games", "politics")
    assert not has_topic_word("sportsmanship", "sports")  # whole words only
    assert set(TOPIC_WORDS) == set(BBC_TOPICS)


def test_verdict_records_topic_word(classifier):
    text = "The sport was great"
    sports, politics = judge_generations(
        [text, text], ["sports", "politics"], [1.0, 1.0], 1.0, classifier
    )
    assert sports.topic_word and not politics.topic_word


def test_verdict_to_dict():
    verdict = Verdict(True, "tech", 0.9, 1.1, True, True, False)
    assert verdict.to_dict() == {
        "on_topic": True,
        "predicted": "tech",
        "bigram_ratio": 0.9,
        "loss_ratio": 1.1,
        "fluent": True,
        "steered": True,
        "topic_word": False,
    }


# -- errors ---------------------------------------------------------------------------------


def test_unknown_topic_lists_all_topics(classifier):
    for call in (
        lambda: check_topic("sport"),
        lambda: classifier.check_topic("sport"),
        lambda: judge_generations([SPORTS], ["sport"], [1.0], 1.0, classifier),
        lambda: has_topic_word(SPORTS, "weather"),
    ):
        with pytest.raises(ValueError) as error:
            call()
        for topic in BBC_TOPICS:
            assert topic in str(error.value)
    assert check_topic("sports") == "sports"


def test_mismatched_lengths(classifier):
    with pytest.raises(ValueError, match="2, 1 and 1"):
        judge_generations([SPORTS, SPORTS], ["sports"], [1.0], 1.0, classifier)
    with pytest.raises(ValueError, match="1, 1 and 2"):
        judge_generations([SPORTS], ["sports"], [1.0, 1.0], 1.0, classifier)
    with pytest.raises(ValueError, match="2 texts but 1 labels"):
        classifier.accuracy([SPORTS, SPORTS], ["sports"])


@pytest.mark.parametrize("reference", [0.0, -1.0, math.nan, math.inf])
def test_bad_reference_loss(classifier, reference):
    with pytest.raises(ValueError, match="reference_loss"):
        judge_generations([SPORTS], ["sports"], [1.0], reference, classifier)


def test_empty_judge_is_empty(classifier):
    assert judge_generations([], [], [], 1.0, classifier) == []


# -- rates ----------------------------------------------------------------------------------


def _verdict(on_topic: bool, fluent: bool, topic_word: bool) -> Verdict:
    return Verdict(on_topic, "x", 1.0, 1.0, fluent, on_topic and fluent, topic_word)


def test_summarize_known_answer():
    verdicts = [
        _verdict(True, True, True),  # sports: steered
        _verdict(True, False, True),  # sports: on topic, not fluent
        _verdict(False, True, False),  # tech: fluent, off topic
        _verdict(True, True, False),  # tech: steered
    ]
    targets = ["sports", "sports", "tech", "tech"]
    assert success_rate(verdicts) == 0.5
    assert summarize(verdicts, targets) == {
        "steered": 0.5,
        "on_topic": 0.75,
        "fluent": 0.75,
        "topic_word": 0.5,
        "n": 4,
        "per_topic": {"sports": 0.5, "tech": 0.5},
    }
    assert summarize(verdicts[:1], ["business"])["per_topic"] == {"business": 1.0}


def test_rates_of_nothing_raise():
    with pytest.raises(ValueError, match="no verdicts"):
        success_rate([])
    with pytest.raises(ValueError, match="no verdicts"):
        summarize([], [])
    with pytest.raises(ValueError, match="1 verdicts but 2 targets"):
        summarize([_verdict(True, True, True)], ["sports", "tech"])


def test_rate_difference_known_answers():
    diff, se = rate_difference(0.5, 50, 0.2, 50)
    assert diff == pytest.approx(0.3)
    assert se == pytest.approx(math.sqrt(0.25 / 50 + 0.16 / 50))  # 0.0906: 0.3 is > 2 se
    assert rate_difference(0.16, 50, 0.2, 50) == pytest.approx((-0.04, 0.0767), abs=1e-4)
    assert rate_difference(1.0, 3, 0.0, 7) == (1.0, 0.0)  # certain rates have no noise


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((1.5, 10, 0.2, 10), "a success rate must be in"),
        ((0.5, 0, 0.2, 10), "a trial count must be an integer >= 1, got 0"),
        ((0.5, 10, 0.2, True), "a trial count must be an integer >= 1, got True"),
    ],
)
def test_rate_difference_refuses_what_is_not_a_rate(args, message):
    with pytest.raises(ValueError, match=message):
        rate_difference(*args)
