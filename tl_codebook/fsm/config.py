"""What a TokFSM run is: `ExperimentConfig` (one flat dataclass, saved in metrics.json), the named
presets of `tl-codebook demo`, and the TokFSM model shape shared with the comparison.

Kept apart from the pipeline so that loading a run's config (the comparison reads a demo's run
directory) imports no training code.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from transformer_lens import HookedTransformerConfig

from tl_codebook.configs import check_choice, dataclass_from_dict
from tl_codebook.fsm.machine import FSMConfig
from tl_codebook.training.config import CODEBOOK_INITS, SCHEDULES

CODEBOOK_SITES = ("attn.hook_z", "hook_mlp_out")
"""Per-layer sites a codebook can sit at; `attn.hook_z` gets one group per head."""
PAPER_FSM_CODES = 1536
"""Codes per codebook of the paper-fsm preset (the paper: 1000). Measured on seed 1's base
model (docs/tokfsm.md): 1024 codes gave 0.946 transition accuracy, 2048 gave 0.990 but split
the states over several codes (states with a precise code 0.48), 1536 gave 0.978 and 0.93."""
CODEBOOK_ROUTES = ("fine-tune", "scratch")
"""How phase 2 gets its codebook model: "fine-tune" the trained base model jointly with the
codebooks (ours), or train a fresh model from "scratch" with the codebooks in place (the
reference's)."""


def tokfsm_model_kwargs(
    shape: Any, vocab_size: int, device: str, positional_embedding_type: str = "rotary"
) -> dict[str, Any]:
    """HookedTransformerConfig arguments of a TokFSM model, from any config with the fields
    n_layers, d_model, n_heads, d_mlp, seq_len and seed (the demo's and the comparison's)."""
    return dict(
        n_layers=shape.n_layers,
        d_model=shape.d_model,
        n_heads=shape.n_heads,
        d_head=shape.d_model // shape.n_heads,
        d_mlp=shape.d_mlp,
        n_ctx=shape.seq_len,
        d_vocab=vocab_size,
        act_fn="gelu",
        normalization_type="LN",
        positional_embedding_type=positional_embedding_type,
        seed=shape.seed,
        device=device,
    )


@dataclass
class ExperimentConfig:
    """Everything that defines a TokFSM run (flat, so each field is one `--set key=value`).

    The defaults are the CPU setting of `tl-codebook demo` (a few minutes on 2 cores); `paper()`
    is the paper's setting and `toy()` a seconds-long run that still learns its small FSM. Why
    these CPU defaults (measured against the alternatives; about 5 minutes on 2 cores):

    - 4 layers, the paper's depth at half its width: states with a precise code were about
      0.72 with 2 layers, 0.75-0.81 with 3, 0.78-0.84 with 4; weight decay 0.1 on the model's
      weights raised it to 0.81-0.88 (0.3 lowers everything).
    - N=32, E=4, base 10 (2 digits per state), 32-token sequences: a rotary model must count to
      know which digit of a state it reads, and in a long sample one slip derails the rest
      (64 tokens: 0.95-0.98 transition accuracy after 1000 steps; 32 tokens: >= 0.99).
    - 128 codes per codebook (4 per state), k=1: 96 codes cost transition accuracy (0.96), 64
      much more (0.83). Codes start as k-means centres of the base model's activations (loss
      just after insertion 0.77 vs 1.22 for random activations; N(0, 1) does not recover).
    - Fine-tuning at 0.1x the codebooks' learning rate for the model's own weights
      (`model_lr_factor`; at 1x the loss rises during fine-tuning), cosine decay in both phases.

    Both phases run on the project's one trainer (`tl_codebook.training.train_codebooks`); see
    `tl_codebook.fsm.models` for how these fields become its `TrainConfig`s.

    Raises:
        ValueError: on construction, for an unknown codebook site, `lr_schedule` or
            `codebook_init`, a `d_model` that `n_heads` does not divide, a threshold or fraction
            outside [0, 1], a size or count that is not an integer >= 1, a negative
            `checkpoint_every`, `k > num_codes`, or an FSM size `FSMConfig` refuses.
    """

    # the task
    n_states: int = 32
    """States of the FSM (the paper: 100)."""
    n_edges: int = 4
    """Out-edges per state (the paper: 10)."""
    base: int = 10
    """Digit base of the token format."""
    fsm_seed: int = 0
    """Seed of the FSM's random transitions."""
    seq_len: int = 32
    """Tokens per training sequence, BOS included (also the model's n_ctx)."""
    # the model
    n_layers: int = 4
    """Transformer layers."""
    d_model: int = 64
    """Residual stream width."""
    n_heads: int = 4
    """Attention heads per layer (`d_head = d_model // n_heads`)."""
    d_mlp: int = 256
    """MLP hidden width."""
    positional_embedding_type: str = "rotary"
    """TransformerLens' positional embedding ("rotary", "standard", ...)."""
    # the codebooks
    codebook_sites: tuple[str, ...] = CODEBOOK_SITES
    """Per-layer sites that get a codebook at every layer (see `CODEBOOK_SITES`)."""
    num_codes: int = 128
    """Codes per codebook group."""
    k: int = 1
    """Codes active per token and group."""
    similarity: str = "inner_product"
    """How activations score against codes ("inner_product", "cosine", "euclidean")."""
    codebook_route: str = "fine-tune"
    """"fine-tune": insert the codebooks into the trained base model and fine-tune both
    jointly; "scratch": the reference's route, a freshly initialised model (the base model's
    initial weights) trained with its codebooks in place (see `CODEBOOK_ROUTES`)."""
    codebook_init: str = "kmeans"
    """"kmeans": k-means centres of the base model's activations (BOS positions left out: an
    outlier); "activations": random real activations (right scale from the first step);
    "random": N(0, 1) as in the paper's from-scratch runs."""
    dead_code_every: int = 0
    """Replace codes no position chose over the last N fine-tuning steps by recent
    activations plus noise (the trainer's `dead_code_every`); 0: never."""
    # training
    base_steps: int = 1200
    """Steps of phase 1: training the base model on the FSM's sequences."""
    base_batch_size: int = 128
    """Sequences per step in phase 1."""
    base_lr: float = 3e-3
    """Peak learning rate of phase 1."""
    codebook_steps: int = 500
    """Steps of phase 2: joint fine-tuning with the codebooks inserted."""
    codebook_batch_size: int = 128
    """Sequences per step in phase 2."""
    codebook_lr: float = 1e-3
    """Peak learning rate of the codebooks in phase 2."""
    codebook_weight_decay: float = 0.01
    """AdamW weight decay of the codes."""
    weight_decay: float = 0.1
    """AdamW weight decay of the model's own weights (both phases)."""
    lr_schedule: str = "cosine"
    """After a linear warm-up over min(100, steps / 10) steps: "cosine" (decay to
    `min_lr_fraction`; sharper models, fewer rare errors), "constant" (the paper's) or
    "linear" (to 0)."""
    min_lr_fraction: float = 0.1
    """Where the cosine schedule ends, as a fraction of the learning rate."""
    model_lr_factor: float = 0.1
    """The model's learning rate relative to the codebooks' during joint fine-tuning."""
    checkpoint_every: int = 100
    """Training steps between checkpoints of each phase (`training/<phase>/checkpoints`), so a
    killed run resumed with `--resume` loses at most this many steps; 0: no checkpoints."""
    # evaluation
    n_samples: int = 200
    """Sampled continuations (temperature 1, from BOS + one state) for transition accuracy."""
    n_held_out: int = 512
    """Held-out sequences for the next-token loss and the state-code analysis."""
    precise_threshold: float = 0.9
    """A state has a precise code when one code's precision and recall for it are both at
    least this."""
    n_intervention_prompts: int = 400
    """Prompts steered per intervention condition."""
    intervention_prompt_states: int = 3
    """States of each steering prompt's random walk (after BOS)."""
    intervention_temperature: float = 1.0
    """Sampling temperature of the steered continuations."""
    steering_min_precision: float = 0.0
    """A (site, group) takes part in steering when its best code for the target state has at
    least this precision (0: every codebook)."""
    # the run
    seed: int = 0
    """Seeds the model's initialisation, the data streams, sampling and steering."""
    threads: int = 2
    """torch CPU threads during the run (0: leave torch's setting; ignored on GPU)."""
    device: str = "auto"
    """"auto" (CUDA when available, else CPU), "cpu", "cuda", ..."""
    progress: bool = True
    """Show progress bars."""

    def __post_init__(self) -> None:
        self.codebook_sites = tuple(self.codebook_sites)
        for site in self.codebook_sites:
            check_choice("ExperimentConfig.codebook_sites entry", site, CODEBOOK_SITES)
        check_choice("ExperimentConfig.lr_schedule", self.lr_schedule, SCHEDULES)
        check_choice("ExperimentConfig.codebook_init", self.codebook_init, CODEBOOK_INITS)
        check_choice("ExperimentConfig.codebook_route", self.codebook_route, CODEBOOK_ROUTES)
        if self.d_model % self.n_heads:
            raise ValueError(
                f"ExperimentConfig.d_model={self.d_model} must be divisible by "
                f"n_heads={self.n_heads}."
            )
        for name in ("precise_threshold", "steering_min_precision", "min_lr_fraction"):
            value = getattr(self, name)
            if not 0 <= value <= 1:
                raise ValueError(f"ExperimentConfig.{name} must be in [0, 1], got {value!r}.")
        positive = (
            "seq_len n_layers d_model n_heads d_mlp num_codes k base_steps base_batch_size "
            "codebook_steps codebook_batch_size n_samples n_held_out n_intervention_prompts "
            "intervention_prompt_states"
        ).split()
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ExperimentConfig.{name} must be an integer >= 1, got {value!r}.")
        for name in ("checkpoint_every", "dead_code_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"ExperimentConfig.{name} must be an integer >= 0, got {value!r}.")
        if self.k > self.num_codes:
            raise ValueError(
                f"ExperimentConfig.k={self.k} must be at most num_codes={self.num_codes}."
            )
        self.fsm_config()  # validates n_states, n_edges, base

    # -- presets -----------------------------------------------------------------------------

    @classmethod
    def toy(cls) -> ExperimentConfig:
        """Seconds on a CPU, and still learns its 6-state FSM (transition accuracy about 0.95
        against about 0.3 for a model that guesses): the smoke test of the whole pipeline."""
        return cls(
            n_states=6,
            n_edges=2,
            base=3,
            seq_len=16,
            n_layers=1,
            d_model=32,
            n_heads=2,
            d_mlp=64,
            num_codes=24,
            base_steps=400,
            base_batch_size=32,
            codebook_steps=100,
            codebook_batch_size=32,
            checkpoint_every=50,
            n_samples=64,
            n_held_out=64,
            n_intervention_prompts=48,
            threads=1,
        )

    @classmethod
    def paper(cls) -> ExperimentConfig:
        """The paper's TokFSM setting (for a GPU): N=100, E=10, base 10, 4 layers, 1000 codes."""
        return cls(
            n_states=100,
            n_edges=10,
            base=10,
            seq_len=128,
            n_layers=4,
            d_model=128,
            n_heads=4,
            d_mlp=512,
            num_codes=1000,
            k=1,
            base_steps=20_000,
            base_batch_size=512,
            base_lr=1e-3,
            codebook_steps=20_000,
            codebook_batch_size=512,
            codebook_lr=1e-3,
            lr_schedule="constant",
            model_lr_factor=1.0,
            weight_decay=0.0,
            checkpoint_every=1000,
            n_samples=200,
            n_held_out=1024,
            n_intervention_prompts=2000,
        )

    @classmethod
    def paper_fsm(cls) -> ExperimentConfig:
        """The paper's machine and codebook sites at a size a 2-core CPU trains in under 30
        minutes (`tl-codebook demo --preset paper-fsm`).

        Kept from the paper exactly: N=100 states, E=10 out-edges, 2 base-10 digits per state,
        BOS + digits sequences, a codebook on every layer's `attn.hook_z` (one group per head)
        and `hook_mlp_out`, k=1, inner product; 4 layers. Chosen by measurement (issue 14; the
        search is written down in docs/tokfsm.md): learned absolute positions instead of rotary
        (with N=100 every digit pair is a state, so a rotary model must count to know which
        digit of a state it reads: 0.84 transition accuracy against 0.99), `PAPER_FSM_CODES`
        codes per codebook (up to N * E = 1000 contexts to tell apart; 128 codes gave 0.27),
        and the CPU default's steps. Measured on seeds 0, 1, 2 (about 11 minutes each on one
        core): codebook model 0.987 / 0.978 / 0.980 transition accuracy, 0.993 / 0.991 / 0.990
        exact first-transition accuracy, 0.91 / 0.92 / 0.94 states with a precise code,
        0.963 / 0.985 / 0.975 steering.
        """
        return cls(
            n_states=100,
            n_edges=10,
            base=10,
            positional_embedding_type="standard",
            num_codes=PAPER_FSM_CODES,
        )

    # -- derived -----------------------------------------------------------------------------

    def fsm_config(self) -> FSMConfig:
        """The `FSMConfig` of the run's task (n_states, n_edges, base, fsm_seed).

        Raises:
            ValueError: for sizes `FSMConfig` refuses (e.g. `n_edges > n_states`).
        """
        return FSMConfig(
            n_states=self.n_states, n_edges=self.n_edges, base=self.base, seed=self.fsm_seed
        )

    def model_config(self, vocab_size: int, device: str) -> HookedTransformerConfig:
        """The TransformerLens config of the run's model: the shape fields, `n_ctx = seq_len`,
        `d_vocab = vocab_size` (the FSM's `vocab_size`), GELU, LayerNorm, on `device`."""
        return HookedTransformerConfig(
            **tokfsm_model_kwargs(self, vocab_size, device, self.positional_embedding_type)
        )

    def hook_names(self) -> list[str]:
        """Every codebook site's full hook name, layer by layer."""
        return [
            f"blocks.{layer}.{site}"
            for layer in range(self.n_layers)
            for site in self.codebook_sites
        ]

    # -- persistence -------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The config as a JSON-ready dict (as metrics.json records it)."""
        data = dataclasses.asdict(self)
        data["codebook_sites"] = list(self.codebook_sites)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ExperimentConfig:
        """Build a config from a (possibly partial) dict: unknown keys (with close matches) and
        wrong-typed values are refused, naming the field.

        Raises:
            ValueError: for a non-dict, an unknown key, a wrongly typed value, or any check of
                the config.
        """
        if isinstance(data, dict):
            data = dict(data)
            if isinstance(data.get("codebook_sites"), list):  # JSON has no tuples
                data["codebook_sites"] = tuple(data["codebook_sites"])
            for f in dataclasses.fields(cls):  # an int where a float goes (`--set base_lr=1`)
                value = data.get(f.name)
                if f.type == "float" and isinstance(value, int) and not isinstance(value, bool):
                    data[f.name] = float(value)
        return dataclass_from_dict(cls, data)

    def replace(self, **changes: Any) -> ExperimentConfig:
        """A copy with `changes` applied, checked like `from_dict` (e.g. `cfg.replace(k=2)`).

        Raises:
            ValueError: for an unknown field or a value the config refuses.
        """
        return ExperimentConfig.from_dict({**self.to_dict(), **changes})


PRESETS: dict[str, Callable[[], ExperimentConfig]] = {
    "cpu": ExperimentConfig,
    "paper": ExperimentConfig.paper,
    "paper-fsm": ExperimentConfig.paper_fsm,
    "toy": ExperimentConfig.toy,
}
"""The named starting points of `tl-codebook demo --preset`: name -> a function returning a
fresh `ExperimentConfig` ("cpu": the defaults, "paper": `ExperimentConfig.paper()`,
"paper-fsm": `ExperimentConfig.paper_fsm()`, "toy": `ExperimentConfig.toy()`)."""

RUN_ONLY_FIELDS = ("threads", "device", "progress", "checkpoint_every")
"""Fields that change how a run executes but not what it computes: a resumed run may change
them."""
