"""Codebook features on a pretrained language model and real labelled text: the paper's
language-model half (`tl-codebook demo --task lm`).

- `config`: `LMExperimentConfig` and its scales (cpu, toy, paper);
- `labels`: ground truth for concept codes (month regex, VADER negative words, article rows);
- `judge`: is a generation on topic (a scikit-learn classifier) and fluent;
- `steering`: a topic's codes, forced on while the model writes;
- `experiment`: the run, phase by phase; `report`: its index.html.

Modules are imported on use, so `import tl_codebook.text` costs nothing.
"""

_LAZY = {
    "LMExperimentConfig": "tl_codebook.text.config",
    "LM_PRESETS": "tl_codebook.text.config",
    "NEUTRAL_PROMPTS": "tl_codebook.text.config",
    "run_lm_experiment": "tl_codebook.text.experiment",
    "lm_metrics": "tl_codebook.text.experiment",
    "concept_codes": "tl_codebook.text.experiment",
    "steer_topics": "tl_codebook.text.experiment",
    "MONTH_REGEX": "tl_codebook.text.labels",
    "negative_emotion_regex": "tl_codebook.text.labels",
    "vader_lexicon": "tl_codebook.text.labels",
    "document_rows": "tl_codebook.text.labels",
    "TopicClassifier": "tl_codebook.text.judge",
    "Verdict": "tl_codebook.text.judge",
    "judge_generations": "tl_codebook.text.judge",
    "distinct_bigram_ratio": "tl_codebook.text.judge",
    "summarize": "tl_codebook.text.judge",
    "rate_difference": "tl_codebook.text.judge",
    "choose_topic_codes": "tl_codebook.text.steering",
    "generate_continuations": "tl_codebook.text.steering",
    "continuation_losses": "tl_codebook.text.steering",
    "forcing": "tl_codebook.text.steering",
    "write_lm_report": "tl_codebook.text.report",
}


def __getattr__(name: str):  # noqa: ANN202 - module-level lazy attribute
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "LMExperimentConfig",
    "LM_PRESETS",
    "MONTH_REGEX",
    "NEUTRAL_PROMPTS",
    "TopicClassifier",
    "Verdict",
    "choose_topic_codes",
    "concept_codes",
    "continuation_losses",
    "distinct_bigram_ratio",
    "document_rows",
    "forcing",
    "generate_continuations",
    "judge_generations",
    "lm_metrics",
    "negative_emotion_regex",
    "run_lm_experiment",
    "steer_topics",
    "rate_difference",
    "summarize",
    "vader_lexicon",
    "write_lm_report",
]
