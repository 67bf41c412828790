"""Is a steered generation on topic and fluent? The success test of the topic-steering experiment.

Forcing a topic's codes on while the model writes "works" only if the text is about the topic
*and* still reads as text: forcing codes hard enough makes a model repeat one word ("Sony Sony
Sony ..."), which mentions the topic but is not a steered generation. So a generation counts as
steered only if both hold:

- on topic: a topic classifier trained on labelled BBC News articles (`TopicClassifier`,
  TF-IDF over words and word pairs + logistic regression, about 0.99 accuracy on the held-out
  BBC split) predicts the target topic. A classifier rather than a keyword list, because an
  article is about politics without saying "politics";
- fluent: its distinct-bigram ratio is at least `FLUENCY_MIN_BIGRAM_RATIO` (repetition lowers
  it) and the base model's loss on it is at most `FLUENCY_MAX_LOSS_RATIO` times the mean loss
  on unsteered generations (word salad without repeats raises it).

`Verdict.topic_word` also records the reference tutorial's own, weaker measure: whether the
topic's word appears in the text at all (`TOPIC_WORDS`), so results can be compared with it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from tl_codebook.configs import check_choice
from tl_codebook.corpora import BBC_TOPICS

__all__ = [
    "FLUENCY_MAX_LOSS_RATIO",
    "FLUENCY_MIN_BIGRAM_RATIO",
    "TOPIC_WORDS",
    "TopicClassifier",
    "Verdict",
    "check_topic",
    "distinct_bigram_ratio",
    "has_topic_word",
    "judge_generations",
    "rate_difference",
    "success_rate",
    "summarize",
    "tokens",
]

FLUENCY_MIN_BIGRAM_RATIO = 0.5
"""A fluent text has at least half of its bigrams distinct; "Sony Sony Sony" has one in n-1."""

FLUENCY_MAX_LOSS_RATIO = 1.5
"""A fluent text's base-model loss is at most 1.5x the mean loss on unsteered generations."""

TOPIC_WORDS: dict[str, tuple[str, ...]] = {
    "business": ("business",),
    "entertainment": ("entertainment",),
    "politics": ("politics", "political"),
    "sports": ("sport", "sports"),
    "tech": ("tech", "technology"),
}
"""Each BBC topic's own name (singular/plural or adjective) for the string-match measure.

The reference tutorial counted a generation as steered if the topic word appears in it; this
keeps that measure (case-insensitive, whole words) with just the topic's own name, no wider
keyword list, so it stays the reference's measure rather than a second classifier."""

_TOKEN = re.compile(r"\w+|[^\w\s]")
_TOPIC_WORD_PATTERNS = {
    topic: re.compile(r"\b(?:" + "|".join(map(re.escape, words)) + r")\b", re.IGNORECASE)
    for topic, words in TOPIC_WORDS.items()
}


def check_topic(topic: str, topics: Sequence[str] = BBC_TOPICS) -> str:
    """Return `topic` if it is one of `topics`, else a ValueError that lists them all.

    A misspelt target ("sport" for "sports") would otherwise just never be predicted and read
    as a steering failure.
    """
    return check_choice("topic", topic, topics)


def tokens(text: str) -> list[str]:
    """Lowercase word and punctuation tokens (`\\w+|[^\\w\\s]`), the units of the bigram ratio.

    Punctuation is a token so that "!!!!" repeats count as repetition too.
    """
    return _TOKEN.findall(text.lower())


def distinct_bigram_ratio(text: str) -> float:
    """Distinct bigrams / bigrams over `tokens(text)`: 1.0 for no repeated pair, near 0 for a loop.

    A text of fewer than 2 tokens has no bigram and gives 0.0: it cannot show fluency, and an
    empty or one-word generation must not pass the fluency test by default.
    """
    words = tokens(text)
    if len(words) < 2:
        return 0.0
    bigrams = list(zip(words, words[1:]))
    return len(set(bigrams)) / len(bigrams)


def has_topic_word(text: str, topic: str) -> bool:
    """Whether one of `TOPIC_WORDS[topic]` appears in `text` (case-insensitive, whole word).

    The reference tutorial's success measure; weaker than the classifier, since a looping
    "sport sport sport" passes it.
    """
    check_topic(topic, tuple(TOPIC_WORDS))
    return _TOPIC_WORD_PATTERNS[topic].search(text) is not None


class TopicClassifier:
    """A TF-IDF + logistic-regression topic classifier: is a text about a given topic?

    Words and word pairs (seen in at least 2 documents, English stop words dropped, sublinear
    term frequency) feed a logistic regression (C=10). On BBC News it reaches about 0.99
    accuracy on the held-out split. Fitting on the BBC train split (2,004 articles) takes about
    8 s on one CPU core, so the classifier is refitted when needed rather than persisted: its
    68,000-term vocabulary would be a large file, and no pickle is ever loaded.
    """

    def __init__(self, pipeline: Any):
        """Wrap a fitted scikit-learn pipeline whose last step has `classes_` (use `fit`)."""
        self.pipeline = pipeline

    @classmethod
    def fit(cls, texts: Sequence[str], labels: Sequence[str]) -> TopicClassifier:
        """Fit a classifier on labelled texts; the same texts and labels give the same model.

        Raises:
            ValueError: if texts and labels differ in length or fewer than 2 labels occur.
        """
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline

        if len(texts) != len(labels):
            raise ValueError(f"{len(texts)} texts but {len(labels)} labels; they must match.")
        if len(set(labels)) < 2:
            raise ValueError(f"a classifier needs at least 2 labels, got {sorted(set(labels))}.")
        pipeline = make_pipeline(
            TfidfVectorizer(sublinear_tf=True, ngram_range=(1, 2), min_df=2, stop_words="english"),
            LogisticRegression(max_iter=1000, C=10.0, random_state=0),
        )
        pipeline.fit(list(texts), list(labels))
        return cls(pipeline)

    @classmethod
    def for_bbc_news(cls, split: str = "train") -> TopicClassifier:
        """A classifier fitted on one split of BBC News ("train" keeps "test" for scoring it)."""
        from tl_codebook.corpora import corpus_dataset

        dataset = corpus_dataset("bbc-news", split)
        return cls.fit(list(dataset["text"]), list(dataset["label"]))

    @property
    def topics(self) -> list[str]:
        """The topics it can predict, sorted: the column order of `probabilities`."""
        return [str(t) for t in self.pipeline.classes_]

    def check_topic(self, topic: str) -> str:
        """Return `topic` if this classifier knows it, else a ValueError listing its topics."""
        return check_topic(topic, self.topics)

    def predict(self, texts: Sequence[str]) -> list[str]:
        """The most probable topic of each text."""
        if len(texts) == 0:
            return []
        return [str(t) for t in self.pipeline.predict(list(texts))]

    def probabilities(self, texts: Sequence[str]) -> np.ndarray:
        """[n_texts, n_topics] topic probabilities, columns in `topics` order; rows sum to 1."""
        if len(texts) == 0:
            return np.zeros((0, len(self.topics)))
        return np.asarray(self.pipeline.predict_proba(list(texts)))

    def accuracy(self, texts: Sequence[str], labels: Sequence[str]) -> float:
        """The fraction of texts whose predicted topic is their label.

        Raises:
            ValueError: if texts and labels differ in length or are empty.
        """
        if len(texts) != len(labels):
            raise ValueError(f"{len(texts)} texts but {len(labels)} labels; they must match.")
        if len(texts) == 0:
            raise ValueError("accuracy of no texts is undefined.")
        predicted = self.predict(texts)
        return sum(p == y for p, y in zip(predicted, labels)) / len(texts)


@dataclass(frozen=True)
class Verdict:
    """Whether one generation was steered to its target topic, and the measurements behind it."""

    on_topic: bool
    """The classifier predicts the target topic."""
    predicted: str
    """The topic the classifier predicts."""
    bigram_ratio: float
    """`distinct_bigram_ratio` of the text."""
    loss_ratio: float
    """The base model's loss on the text divided by the reference (unsteered) loss."""
    fluent: bool
    """bigram_ratio >= the minimum and loss_ratio <= the maximum."""
    steered: bool
    """on_topic and fluent: the success measure."""
    topic_word: bool
    """The target's `TOPIC_WORDS` appear in the text: the reference tutorial's measure."""

    def to_dict(self) -> dict[str, Any]:
        """The verdict as a JSON-ready dict (field name -> value)."""
        return asdict(self)


def judge_generations(
    texts: Sequence[str],
    targets: Sequence[str],
    losses: Sequence[float],
    reference_loss: float,
    classifier: TopicClassifier,
    min_bigram_ratio: float = FLUENCY_MIN_BIGRAM_RATIO,
    max_loss_ratio: float = FLUENCY_MAX_LOSS_RATIO,
) -> list[Verdict]:
    """Judge each generation against its target topic: on topic, fluent, steered.

    Args:
        texts: the generations (the text the model wrote, without the prompt is best: a
            prompt about the topic would make every generation look on topic).
        targets: the topic each generation was steered towards.
        losses: the base model's mean per-token loss on each generation (unsteered model).
        reference_loss: the mean of those losses on unsteered generations, the fluency baseline.
        classifier: the topic classifier (`TopicClassifier.for_bbc_news()`).
        min_bigram_ratio: a fluent text's least distinct-bigram ratio.
        max_loss_ratio: a fluent text's greatest loss / reference_loss; a NaN loss is not fluent.

    Raises:
        ValueError: if texts, targets and losses differ in length (the lengths are named), a
            target is not one of the classifier's topics (they are listed), or reference_loss
            is not a finite positive number.
    """
    if not len(texts) == len(targets) == len(losses):
        raise ValueError(
            f"texts, targets and losses must have the same length, got {len(texts)}, "
            f"{len(targets)} and {len(losses)}."
        )
    reference_loss = float(reference_loss)
    if not (math.isfinite(reference_loss) and reference_loss > 0):
        raise ValueError(f"reference_loss must be finite and > 0, got {reference_loss}.")
    for target in targets:
        classifier.check_topic(target)
    predicted = classifier.predict(texts)
    verdicts = []
    for text, target, loss, guess in zip(texts, targets, losses, predicted):
        bigram_ratio = distinct_bigram_ratio(text)
        loss_ratio = float(loss) / reference_loss
        on_topic = guess == target
        fluent = bool(bigram_ratio >= min_bigram_ratio and loss_ratio <= max_loss_ratio)
        verdicts.append(
            Verdict(
                on_topic=on_topic,
                predicted=guess,
                bigram_ratio=float(bigram_ratio),
                loss_ratio=loss_ratio,
                fluent=fluent,
                steered=on_topic and fluent,
                topic_word=target in TOPIC_WORDS and has_topic_word(text, target),
            )
        )
    return verdicts


def success_rate(verdicts: Sequence[Verdict]) -> float:
    """The fraction of generations that were steered (on topic and fluent).

    Raises:
        ValueError: for no verdicts (a rate of nothing is undefined, not 0).
    """
    if len(verdicts) == 0:
        raise ValueError("success rate of no verdicts is undefined.")
    return sum(v.steered for v in verdicts) / len(verdicts)


def summarize(verdicts: Sequence[Verdict], targets: Sequence[str]) -> dict[str, Any]:
    """JSON-ready rates: steered, on_topic, fluent, topic_word, and the steered rate per topic.

    `per_topic` holds only the topics that occur in `targets`, sorted.

    Raises:
        ValueError: for no verdicts, or verdicts and targets of different lengths.
    """
    if len(verdicts) != len(targets):
        raise ValueError(f"{len(verdicts)} verdicts but {len(targets)} targets; they must match.")
    n = len(verdicts)
    if n == 0:
        raise ValueError("a summary of no verdicts is undefined.")
    per_topic = {}
    for topic in sorted(set(targets)):
        mine = [v for v, t in zip(verdicts, targets) if t == topic]
        per_topic[topic] = success_rate(mine)
    return {
        "steered": success_rate(verdicts),
        "on_topic": sum(v.on_topic for v in verdicts) / n,
        "fluent": sum(v.fluent for v in verdicts) / n,
        "topic_word": sum(v.topic_word for v in verdicts) / n,
        "n": n,
        "per_topic": per_topic,
    }


def rate_difference(a: float, n_a: int, b: float, n_b: int) -> tuple[float, float]:
    """`a - b` for two success rates over `n_a` and `n_b` trials, and its standard error
    sqrt(a(1-a)/n_a + b(1-b)/n_b) (independent proportions, normal approximation).

    Ten generations per topic make every rate noisy (about 0.06 at 50 trials and a rate of
    0.2): a report says whether a difference is more than two standard errors before it says
    that one condition beat another. The conditions share prompts and seeds, so treating them
    as independent overstates the error a little: the test errs towards "no difference".

    Raises:
        ValueError: for a rate outside [0, 1] or a trial count below 1.
    """
    for rate, n in ((a, n_a), (b, n_b)):
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"a success rate must be in [0, 1], got {rate!r}.")
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"a trial count must be an integer >= 1, got {n!r}.")
    return a - b, math.sqrt(a * (1 - a) / n_a + b * (1 - b) / n_b)
