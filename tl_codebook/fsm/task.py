"""TokFSM as a `Task`: its data, its per-position state labels and its steering measure, plus the
small default model `tl-codebook compare --task tokfsm` trains (or reopens from a run directory).

Concept `s` is "the walk is in state s", labelled at the position where state s's last digit is
read (`determined_states`). Steering: prompts are BOS + a random walk ending in state s; the target
is another state s′; success = the next state the model writes is a successor of s′.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Bool, Int
from safetensors import SafetensorError
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from torch import Tensor
from transformer_lens import HookedTransformerConfig

from tl_codebook.configs import dataclass_from_dict
from tl_codebook.files import atomic_write_bytes, atomic_write_json
from tl_codebook.fsm.dataset import TokFSMDataset, determined_states
from tl_codebook.fsm.machine import FSM, FSMConfig
from tl_codebook.hooks.model import HookedCodebookTransformer
from tl_codebook.tasks import SteeringTrials, Task, check_split

NAME = "tokfsm"
FSM_FILE = "fsm.json"
BASE_MODEL_DIR = "base_model"
MODEL_WEIGHTS = "model.safetensors"
MODEL_CONFIG = "config.json"
_STORE_STREAM_OFFSET = 100
"""`tokens(split="train")` reads the training stream of seed + this, apart from the stream the
default model trains on (seed itself)."""


class TokFSMTask(Task):
    """The TokFSM task of one machine: sequences of `seq_len` tokens, concepts = states.

    Args:
        fsm: the machine.
        seq_len: tokens per sequence, BOS included (>= 2).
        steering_prompt_states: states in each steering prompt's walk (>= 1).

    Raises:
        ValueError: for `seq_len < 2` or `steering_prompt_states < 1` (or non-integers).
    """

    name = NAME

    def __init__(self, fsm: FSM, seq_len: int, steering_prompt_states: int = 3):
        if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
            raise ValueError(f"TokFSMTask.seq_len must be an integer >= 2, got {seq_len!r}.")
        if (
            isinstance(steering_prompt_states, bool)
            or not isinstance(steering_prompt_states, int)
            or steering_prompt_states < 1
        ):
            raise ValueError(
                "TokFSMTask.steering_prompt_states must be an integer >= 1, got "
                f"{steering_prompt_states!r}."
            )
        self.fsm, self.seq_len = fsm, seq_len
        self.steering_prompt_states = steering_prompt_states

    def __repr__(self) -> str:
        return f"TokFSMTask({self.fsm}, seq_len={self.seq_len})"

    # -- concepts -----------------------------------------------------------------------------

    @property
    def concept_names(self) -> list[str]:
        """One concept per FSM state, named "state 0", "state 1", and so on."""
        return [f"state {s}" for s in range(self.fsm.n_states)]

    def concept_labels(self, tokens: Int[Tensor, "n_seq pos"]) -> Int[Tensor, "n_seq pos"]:
        """The state whose last digit sits at each position (`determined_states`), else -1.

        Raises:
            ValueError: if a sequence does not start with BOS.
        """
        return determined_states(self.fsm, tokens)

    @property
    def exclude_token_ids(self) -> list[int]:
        """The BOS token: its activations are outliers, never trained on or scored."""
        return [self.fsm.bos_token]

    # -- data -----------------------------------------------------------------------------------

    def tokens(self, n_sequences: int, split: str = "train", seed: int = 0) -> Int[Tensor, "n pos"]:
        """`n_sequences` random walks as tokens `[n_sequences, seq_len]`, seeded.

        "train" reads a training stream apart from the one the default model trains on;
        "eval" the held-out stream (`TokFSMDataset.held_out`), which no training stream uses.

        Raises:
            ValueError: for a split other than "train" / "eval", or `n_sequences < 1`.
        """
        check_split(split)
        if isinstance(n_sequences, bool) or not isinstance(n_sequences, int) or n_sequences < 1:
            raise ValueError(f"n_sequences must be an integer >= 1, got {n_sequences!r}.")
        if split == "eval":
            return TokFSMDataset(self.fsm, self.seq_len, seed=seed).held_out(n_sequences, seed)
        dataset = TokFSMDataset(self.fsm, self.seq_len, seed=seed + _STORE_STREAM_OFFSET)
        return next(dataset.batches(n_sequences))

    # -- steering -------------------------------------------------------------------------------

    @property
    def has_steering(self) -> bool:
        """True when the FSM has at least 2 states (a prompt needs another state to go to)."""
        return self.fsm.n_states >= 2

    def steering_trials(
        self, n_prompts: int, seed: int = 0, generator: torch.Generator | None = None
    ) -> SteeringTrials:
        """BOS + a walk of `steering_prompt_states` states (s is the last); target a uniformly
        random other state. `generator` (instead of `seed`) continues a caller's stream.

        Each trial generates one state's digits; `positions` is the prompt's last token.

        Raises:
            ValueError: for `n_prompts < 1`, or an FSM with fewer than 2 states.
        """
        if isinstance(n_prompts, bool) or not isinstance(n_prompts, int) or n_prompts < 1:
            raise ValueError(f"n_prompts must be an integer >= 1, got {n_prompts!r}.")
        fsm = self.fsm
        if fsm.n_states < 2:
            raise ValueError("steering needs an FSM with at least 2 states.")
        generator = generator or torch.Generator().manual_seed(seed)
        walks = fsm.sample_trajectories(n_prompts, self.steering_prompt_states, generator)
        sources = walks[:, -1]
        offsets = torch.randint(1, fsm.n_states, (n_prompts,), generator=generator)
        prompts = fsm.trajectory_to_tokens(walks)
        return SteeringTrials(
            prompts=prompts,
            sources=sources,
            targets=(sources + offsets) % fsm.n_states,
            new_tokens=fsm.digits_per_state,
            positions=(prompts.shape[1] - 1,),
        )

    def next_states(self, generated: Int[Tensor, "n total_len"]) -> Int[Tensor, " n"]:
        """The last complete state each sequence writes (-1 where its digits are not a state)."""
        return self.fsm.tokens_to_states(generated.cpu())[:, -1]

    def steering_success(
        self, trials: SteeringTrials, generated: Int[Tensor, "n total_len"]
    ) -> Bool[Tensor, " n"]:
        """Whether the state each continuation ends with is a successor of its target state.

        Args:
            trials: the trials that were steered.
            generated: prompt + continuation token ids `[n, total_len]`.

        Returns:
            Booleans `[n]` (False where the digits written are not a state).
        """
        states = self.next_states(generated)
        valid = states >= 0
        return valid & self.fsm.transition_matrix[trials.targets, states.clamp(min=0)]

    # -- saving ---------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the task name "tokfsm", the FSM, `seq_len`, `steering_prompt_states`."""
        return {
            "name": NAME,
            "fsm": self.fsm.to_dict(),
            "seq_len": self.seq_len,
            "steering_prompt_states": self.steering_prompt_states,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TokFSMTask:
        """The task `to_dict` describes.

        Raises:
            ValueError: for unknown keys, another name, no "fsm" or "seq_len", or a saved FSM
                or size that is refused.
        """
        known = {"name", "fsm", "seq_len", "steering_prompt_states"}
        unknown = sorted(set(data) - known)
        if unknown or data.get("name") != NAME or "fsm" not in data or "seq_len" not in data:
            raise ValueError(
                f"Not a TokFSM task description: expected keys {sorted(known)} with name "
                f"{NAME!r}, got {sorted(data)} (name {data.get('name')!r})."
            )
        return cls(
            FSM.from_dict(data["fsm"]),
            int(data["seq_len"]),
            int(data.get("steering_prompt_states", 3)),
        )

    # -- the default model of `tl-codebook compare` -----------------------------------------

    @classmethod
    def train_default_model(
        cls,
        out_dir: str | Path,
        steps: int,
        seed: int = 0,
        device: str = "cpu",
        progress: bool = True,
    ) -> tuple[HookedCodebookTransformer, TokFSMTask]:
        """Train the comparison's default TokFSM model (`TokFSMModelConfig` with `steps` and
        `seed`) and save it under `out_dir` (`fsm.json`, `base_model/`); see
        `train_tokfsm_model`.

        Returns:
            The trained model (eval mode) and its task.
        """
        config = dataclasses.replace(TokFSMModelConfig(), steps=steps, seed=seed)
        return train_tokfsm_model(config, out_dir, device=device, progress=progress)

    @classmethod
    def load_model(
        cls, model_dir: str | Path, device: str = "cpu"
    ) -> tuple[HookedCodebookTransformer, TokFSMTask]:
        """Reopen a TokFSM model saved by `tl-codebook compare` or `tl-codebook demo`.

        Raises:
            FileNotFoundError: if `fsm.json`, the weights or the model config is missing.
            ValueError: for a damaged or mismatched file (named in the message).
        """
        return load_tokfsm_model(model_dir, device=device)


@dataclass
class TokFSMModelConfig:
    """The comparison's default model: a small TokFSM and a 2-layer transformer trained on it."""

    n_states: int = 32
    n_edges: int = 4
    base: int = 10
    fsm_seed: int = 0
    seq_len: int = 32
    n_layers: int = 2
    d_model: int = 64
    n_heads: int = 4
    d_mlp: int = 256
    steps: int = 400
    batch_size: int = 64
    lr: float = 3e-3
    seed: int = 0

    def fsm(self) -> FSM:
        return FSM.generate(
            FSMConfig(
                n_states=self.n_states, n_edges=self.n_edges, base=self.base, seed=self.fsm_seed
            )
        )

    def model_kwargs(self, vocab_size: int, device: str) -> dict[str, Any]:
        from tl_codebook.fsm.config import tokfsm_model_kwargs

        return tokfsm_model_kwargs(self, vocab_size, device)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TokFSMModelConfig:
        return dataclass_from_dict(cls, data)


def train_tokfsm_model(
    config: TokFSMModelConfig, out_dir: str | Path, device: str = "cpu", progress: bool = True
) -> tuple[HookedCodebookTransformer, TokFSMTask]:
    """Train the default TokFSM model through the one trainer (`train_codebooks`, joint mode, no
    codebook sites: plain next-token training) and save it as `out_dir/fsm.json` +
    `out_dir/base_model/` (every file written atomically)."""
    from tl_codebook.training import TrainConfig, train_codebooks

    fsm = config.fsm()
    model_kwargs = config.model_kwargs(fsm.vocab_size, device)
    torch.manual_seed(config.seed)
    model = HookedCodebookTransformer(HookedTransformerConfig(**model_kwargs))
    batches = TokFSMDataset(fsm, seq_len=config.seq_len, seed=config.seed).batches(
        config.batch_size
    )
    train_codebooks(
        model,
        batches,
        TrainConfig(
            mode="joint",
            sites=[],
            steps=config.steps,
            batch_size=config.batch_size,
            lr=config.lr,
            warmup_steps=max(1, config.steps // 10),
            seed=config.seed,
            progress=progress,
            log_every=max(1, config.steps // 10),
        ),
    )
    model.eval()
    out = Path(out_dir)
    atomic_write_json(out / FSM_FILE, fsm.to_dict())
    weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write_bytes(out / BASE_MODEL_DIR / MODEL_WEIGHTS, safetensors_bytes(weights))
    saved = {k: v for k, v in model_kwargs.items() if k != "device"}
    atomic_write_json(
        out / BASE_MODEL_DIR / MODEL_CONFIG,
        {"model": saved, "tokfsm": dataclasses.asdict(config)},
    )
    return model, TokFSMTask(fsm, config.seq_len)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON (truncated or damaged?): {err}.") from None


def load_tokfsm_model(
    model_dir: str | Path, device: str = "cpu"
) -> tuple[HookedCodebookTransformer, TokFSMTask]:
    """Load a TokFSM model saved by `tl-codebook compare` (base_model/config.json) or by
    `tl-codebook demo` (its metrics.json config). Every damaged, missing or mismatched file is
    a ValueError (FileNotFoundError when missing) naming that file."""
    root = Path(model_dir)
    weights = root / BASE_MODEL_DIR / MODEL_WEIGHTS
    for needed in (root / FSM_FILE, weights):
        if not needed.is_file():
            raise FileNotFoundError(
                f"--model-dir {root}: {needed} is missing; expected a directory written by "
                f"`tl-codebook demo` or `tl-codebook compare` ({FSM_FILE}, "
                f"{BASE_MODEL_DIR}/{MODEL_WEIGHTS})."
            )
    try:
        fsm = FSM.from_dict(_read_json(root / FSM_FILE))
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{root / FSM_FILE} is not a saved FSM: {err}") from None
    own = root / BASE_MODEL_DIR / MODEL_CONFIG
    config_file = own if own.is_file() else root / "metrics.json"
    try:
        if own.is_file():
            kwargs = _read_json(own)["model"]
            cfg = HookedTransformerConfig(**kwargs, device=device)
        elif config_file.is_file():
            from tl_codebook.fsm.config import ExperimentConfig

            experiment = ExperimentConfig.from_dict(_read_json(config_file)["config"])
            cfg = experiment.model_config(fsm.vocab_size, device)
        else:
            raise FileNotFoundError(
                f"--model-dir {root}: no model config; expected {own} (tl-codebook compare) or "
                f"{config_file} (tl-codebook demo)."
            )
    except (KeyError, TypeError) as err:
        raise ValueError(f"{config_file} does not describe a TokFSM model: {err!r}.") from None
    if cfg.d_vocab != fsm.vocab_size:
        raise ValueError(
            f"{config_file} describes a model over {cfg.d_vocab} tokens, but {root / FSM_FILE} "
            f"has {fsm.vocab_size} (digits and BOS): the files come from different runs."
        )
    try:
        state = load_file(str(weights), device=device)
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{weights} cannot be read (truncated or damaged?): {err}.") from None
    model = HookedCodebookTransformer(cfg)
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        first = str(err).strip().splitlines()
        detail = first[1].strip() if len(first) > 1 else first[0]
        raise ValueError(
            f"The weights in {weights} do not fit the model described by {config_file}: {detail}"
        ) from None
    model.eval()
    return model, TokFSMTask(fsm, int(cfg.n_ctx))


__all__ = [
    "NAME",
    "TokFSMModelConfig",
    "TokFSMTask",
    "load_tokfsm_model",
    "train_tokfsm_model",
]
