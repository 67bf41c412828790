"""What a language-model run of `tl-codebook demo --task lm` is: `LMExperimentConfig` (one flat
dataclass, saved in metrics.json) and its named scales.

Kept apart from the pipeline so that reading a run's config imports no model or training code.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tl_codebook.configs import check_choice, dataclass_from_dict
from tl_codebook.training.config import CODEBOOK_INITS, MODES, SCHEDULES

LM_CORPORA = ("bbc-news",)
"""Labelled corpora the LM demo can read: their labels are the topics steering aims at."""

NEUTRAL_PROMPTS = (
    "The",
    "In a statement,",
    "Yesterday",
    "According to",
    "It was reported that",
    "Many people",
    "On Monday,",
    "This week",
    "Last year,",
    "Experts say",
)
"""Prompts that name no topic: what the model writes after them without steering is its own
choice, so a topic that then appears is the intervention's doing."""


@dataclass
class LMExperimentConfig:
    """Everything that defines a language-model codebook run (flat: each field is one `--set`).

    The defaults are the CPU scale (`--scale cpu`, under 30 minutes on 2 cores): SmolLM2-135M
    from its PyPI wheel, BBC News from its PyPI wheel, frozen codebooks on the attention heads
    (`attn.hook_z`, one group per head, k = 8: the paper's design, where a forced code nudges
    the heads it sits in while the residual stream flows on). `toy()` is a seconds-long run for
    tests; `paper()` is the paper's size (10,000 codes, every layer, joint, 15,000 steps) for a GPU.

    Raises:
        ValueError: on construction, for an unknown corpus, mode, schedule or init, a count
            that is not an integer >= 1, a fraction outside [0, 1] or a negative rate.
    """

    model: str = "smollm2-135m"
    """What `tl_codebook.io.load_model` reads: a shortcut, a Llama-family GGUF file or folder."""
    corpus: str = "bbc-news"
    """The labelled corpus (`LM_CORPORA`)."""
    site: str = "attn.hook_z"
    """The per-layer codebook site (`attn.hook_z` gets one group per head)."""
    layers: str = "1,4,7,10,13,16,19,22,25,28"
    """Layers holding a codebook (`all`, `0-3`, `1,3`)."""
    num_codes: int = 1024
    k: int = 8
    similarity: str = "inner_product"
    mode: str = "frozen"
    """"frozen": codebooks learn reconstruction + KL to the base model; "joint": the paper's
    fine-tuning of model and codebooks on next-token loss."""
    steps: int = 80
    batch_size: int = 8
    seq_len: int = 128
    lr: float = 1e-3
    model_lr_factor: float = 0.1
    kl_coef: float = 1.0
    schedule: str = "constant"
    codebook_init: str = "kmeans"
    init_batches: int = 4
    kmeans_iters: int = 25
    eval_rows: int = 32
    """Held-out packed rows (of `seq_len` tokens) the LM losses are measured on."""
    cache_docs: int = 221
    """Held-out articles in the code cache (taking the topics in turn; at most the 221 held out)."""
    cache_seq_len: int = 256
    """Tokens of each cached article (BOS + the first 255); shorter articles are left out. Long
    enough that the word concepts get counts to score (about 100 month names in the default)."""
    min_topic_recall: float = 0.05
    """A topic code must fire on at least this fraction of its topic's cached tokens."""
    min_topic_precision: float = 0.5
    """...and at least this fraction of its firings must be on the topic's tokens."""
    steer_slots: int = 8
    """How many (site, head) slots get a topic's codes forced on when steering."""
    codes_per_slot: int = 2
    """How many of a slot's k codes a topic's codes take when steering (<= k)."""
    topics: list[str] = field(default_factory=list)
    """Topics to steer towards (names of the corpus's labels); empty: all of them."""
    prompts: list[str] = field(default_factory=lambda: list(NEUTRAL_PROMPTS))
    """The prompts generations start from, taken in turn (see `NEUTRAL_PROMPTS`)."""
    prompts_per_topic: int = 10
    """Generations per topic and condition (the reference judged 10 samples)."""
    new_tokens: int = 40
    temperature: float = 0.8
    top_k: int = 50
    sae_lr: float = 1e-3
    """The SAE baseline's learning rate (Adam, constant)."""
    sae_batch_tokens: int = 256
    """The SAE baseline's tokens per step (it sees the codebooks' tokens once)."""
    threads: int = 0
    """CPU threads for torch during the run (0: leave torch's setting)."""
    device: str = "auto"
    seed: int = 0
    progress: bool = True
    checkpoint_every: int = 10

    def __post_init__(self) -> None:
        check_choice("LMExperimentConfig.corpus", self.corpus, LM_CORPORA)
        check_choice("LMExperimentConfig.mode", self.mode, MODES)
        check_choice("LMExperimentConfig.schedule", self.schedule, SCHEDULES)
        check_choice("LMExperimentConfig.codebook_init", self.codebook_init, CODEBOOK_INITS)
        positive = (
            "num_codes",
            "k",
            "steps",
            "batch_size",
            "seq_len",
            "init_batches",
            "kmeans_iters",
            "eval_rows",
            "cache_docs",
            "cache_seq_len",
            "steer_slots",
            "codes_per_slot",
            "prompts_per_topic",
            "new_tokens",
            "top_k",
            "sae_batch_tokens",
        )
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(
                    f"LMExperimentConfig.{name} must be an integer >= 1, got {value!r}."
                )
        for name in ("threads", "checkpoint_every", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(
                    f"LMExperimentConfig.{name} must be an integer >= 0, got {value!r}."
                )
        for name in ("min_topic_recall", "min_topic_precision"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(
                    f"LMExperimentConfig.{name} must be in [0, 1], got {getattr(self, name)!r}."
                )
        for name in ("lr", "model_lr_factor", "kl_coef", "temperature", "sae_lr"):
            if getattr(self, name) < 0:
                raise ValueError(
                    f"LMExperimentConfig.{name} must be >= 0, got {getattr(self, name)!r}."
                )
        from tl_codebook.corpora import BBC_TOPICS

        for topic in self.topics:
            check_choice("LMExperimentConfig.topics entry", topic, BBC_TOPICS)
        if not self.prompts or not all(isinstance(p, str) and p.strip() for p in self.prompts):
            raise ValueError(
                f"LMExperimentConfig.prompts must be a non-empty list of non-empty strings, got {self.prompts!r}."
            )
        if self.codes_per_slot > self.k:
            raise ValueError(
                f"LMExperimentConfig.codes_per_slot={self.codes_per_slot} exceeds k={self.k}: "
                "at most k codes can be active in a slot."
            )
        if self.k > self.num_codes:
            raise ValueError(f"LMExperimentConfig.k={self.k} exceeds num_codes={self.num_codes}.")

    @classmethod
    def toy(cls) -> LMExperimentConfig:
        """Seconds of work on top of loading the model: two layers, a few steps, a tiny cache
        and a few short generations. For tests of the pipeline, not for results."""
        return cls(
            layers="10,14",
            num_codes=64,
            steps=3,
            batch_size=2,
            seq_len=64,
            init_batches=1,
            kmeans_iters=3,
            eval_rows=4,
            cache_docs=15,
            cache_seq_len=64,
            steer_slots=2,
            prompts_per_topic=2,
            new_tokens=8,
            checkpoint_every=2,
        )

    @classmethod
    def paper(cls) -> LMExperimentConfig:
        """The paper's language-model recipe (for a GPU): 10,000 codes, k = 8, inner product on
        every layer's attention heads, joint fine-tuning at lr 5e-4 for 15,000 steps."""
        return cls(
            layers="all",
            num_codes=10_000,
            mode="joint",
            steps=15_000,
            batch_size=32,
            seq_len=512,
            lr=5e-4,
            model_lr_factor=1.0,
            init_batches=64,
            eval_rows=256,
            checkpoint_every=500,
        )

    def to_dict(self) -> dict[str, Any]:
        """The config as a JSON-ready dict (as metrics.json records it)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LMExperimentConfig:
        """Build a config from a (possibly partial) dict, refusing unknown keys and wrong types.

        Raises:
            ValueError: for a non-dict, an unknown key, a wrongly typed value, or any check of
                the config.
        """
        if isinstance(data, dict):
            data = dict(data)
            if isinstance(data.get("topics"), str):  # `--set topics=sports,tech`
                data["topics"] = [t.strip() for t in data["topics"].split(",") if t.strip()]
            if isinstance(data.get("prompts"), str):  # `--set prompts="Once upon a time"`
                data["prompts"] = [data["prompts"]]
            for f in dataclasses.fields(cls):  # an int where a float goes (`--set lr=1`)
                value = data.get(f.name)
                if f.type == "float" and isinstance(value, int) and not isinstance(value, bool):
                    data[f.name] = float(value)
        return dataclass_from_dict(cls, data)

    def replace(self, **changes: Any) -> LMExperimentConfig:
        """A copy with `changes` applied, checked like `from_dict`."""
        return LMExperimentConfig.from_dict({**self.to_dict(), **changes})


LM_PRESETS: dict[str, Callable[[], LMExperimentConfig]] = {
    "cpu": LMExperimentConfig,
    "paper": LMExperimentConfig.paper,
    "toy": LMExperimentConfig.toy,
}
"""`tl-codebook demo --task lm --preset NAME` (or `--scale NAME`): name -> a fresh config."""

LM_RUN_ONLY_FIELDS = ("threads", "device", "progress", "checkpoint_every")
"""Fields that change how a run executes but not what it computes: a resume may change them."""

__all__ = [
    "LM_CORPORA",
    "LM_PRESETS",
    "LM_RUN_ONLY_FIELDS",
    "NEUTRAL_PROMPTS",
    "LMExperimentConfig",
]
