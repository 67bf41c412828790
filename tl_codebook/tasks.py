"""Tasks: what an analysis or a comparison needs to know about the data, and nothing more.

A task hands out token sequences, labelled positions (which concept holds at each token, e.g.
"the current TokFSM state is s"), the tokens that no metric should count (e.g. BOS), and a
steering measure (prompts, the concept to steer each one to, and a check of what the model then
generated). `analysis/` and `comparisons/` take a `Task` and never branch on which one it is:
TokFSM is one (`tl_codebook.fsm.task.TokFSMTask`); a labelled text corpus or a circuit task
plugs in by subclassing `Task` and registering its name (`register_task`), which is how a store
or a report that records `task.to_dict()` is reopened with the same task (`task_from_dict`).

The generation that steering measures (`sample_sequences`: one full forward pass per new token)
also lives here, so every caller steers and samples the same way.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn

from tl_codebook.configs import check_choice

SPLITS = ("train", "eval")
"""The data splits a task hands out: "train" and "eval" (held out, never overlapping train)."""


@dataclass(frozen=True)
class SteeringTrials:
    """A task's steering measure: prompts and the concept each one should be steered to.

    A steering method forces `targets[i]`'s feature while the model continues `prompts[i]` by
    `new_tokens` tokens; `Task.steering_success` then judges the continuation. `positions` are
    the prompt positions where the prompt's own concept (`sources[i]`) becomes known: where an
    intervention that means "the concept is now targets[i]" belongs.

    Raises:
        ValueError: on construction, for `sources` / `targets` that are not `[n]` for `n`
            prompts, `new_tokens` that is not an integer >= 1, or no positions or one outside
            the prompt.
    """

    prompts: Int[Tensor, "n prompt_len"]
    """Token ids of the `n` prompts, all of one length."""
    sources: Int[Tensor, " n"]
    """The concept each prompt is in (what the model would continue without steering)."""
    targets: Int[Tensor, " n"]
    """The concept to steer each prompt to (a concept id of the task)."""
    new_tokens: int
    """Tokens to generate after the prompt before judging success."""
    positions: tuple[int, ...]
    """Prompt positions where the prompt's concept becomes known (e.g. its last token)."""

    def __post_init__(self) -> None:
        n = self.prompts.shape[0]
        if self.sources.shape != (n,) or self.targets.shape != (n,):
            raise ValueError(
                f"SteeringTrials: {n} prompts need {n} sources and targets, got shapes "
                f"{tuple(self.sources.shape)} and {tuple(self.targets.shape)}."
            )
        if isinstance(self.new_tokens, bool) or not isinstance(self.new_tokens, int):
            raise ValueError(
                f"SteeringTrials.new_tokens must be an integer, got {self.new_tokens!r}."
            )
        if self.new_tokens < 1:
            raise ValueError(f"SteeringTrials.new_tokens must be >= 1, got {self.new_tokens}.")
        prompt_len = self.prompts.shape[1]
        if not self.positions or any(not 0 <= p < prompt_len for p in self.positions):
            raise ValueError(
                f"SteeringTrials.positions must be prompt positions in [0, {prompt_len - 1}], "
                f"got {list(self.positions)}."
            )

    @property
    def n(self) -> int:
        """The number of prompts."""
        return int(self.prompts.shape[0])

    @property
    def total_len(self) -> int:
        """Prompt plus generated tokens: the length `steering_success` reads."""
        return int(self.prompts.shape[1]) + self.new_tokens

    def subset(self, rows: Bool[Tensor, " n"]) -> SteeringTrials:
        """The trials where `rows` (booleans `[n]`) is True (same new_tokens and positions)."""
        return dataclasses.replace(
            self, prompts=self.prompts[rows], sources=self.sources[rows], targets=self.targets[rows]
        )

    def aimed_at_sources(self) -> SteeringTrials:
        """The same trials judged against the prompts' own concepts (did the model ignore us?)."""
        return dataclasses.replace(self, targets=self.sources)


class Task(ABC):
    """A task: token data, concept labels per position, excluded tokens, a steering measure.

    Subclasses set `name` (the registry key, see `register_task`) and implement the abstract
    members; steering and `tokens` are optional (the defaults say the task has none). `to_dict`
    must hold everything `from_dict` needs, so a store's metadata can name the task.
    """

    name: ClassVar[str]

    # -- concepts ---------------------------------------------------------------------------

    @property
    @abstractmethod
    def concept_names(self) -> list[str]:
        """One human-readable name per concept id (concept ids are 0..len-1)."""

    @abstractmethod
    def concept_labels(self, tokens: Int[Tensor, "n_seq pos"]) -> Int[Tensor, "n_seq pos"]:
        """The concept known at each position (an id into `concept_names`), -1 where none."""

    @property
    def num_concepts(self) -> int:
        """How many concepts the task labels: `len(concept_names)`."""
        return len(self.concept_names)

    @property
    def exclude_token_ids(self) -> list[int]:
        """Token ids that are never trained on, scored or spliced (e.g. BOS); default none."""
        return []

    # -- data -------------------------------------------------------------------------------

    def tokens(self, n_sequences: int, split: str = "train", seed: int = 0) -> Int[Tensor, "n pos"]:
        """`n_sequences` token sequences of the task's data (`split` "train" or "eval": the eval
        split never overlaps a train stream). Optional: tasks that bring no data raise.

        Returns:
            Integer token ids `[n_sequences, pos]`.

        Raises:
            NotImplementedError: in the base class (a task without data).
        """
        raise NotImplementedError(f"Task {self.name!r} supplies no token data.")

    # -- steering ---------------------------------------------------------------------------

    @property
    def has_steering(self) -> bool:
        """Whether the task defines a steering measure (`steering_trials` and `steering_success`)."""
        return False

    def steering_trials(self, n_prompts: int, seed: int = 0) -> SteeringTrials:
        """`n_prompts` seeded prompts, each with a concept (other than its own) to steer to.

        Raises:
            NotImplementedError: in the base class (a task without a steering measure).
        """
        raise NotImplementedError(f"Task {self.name!r} has no steering measure.")

    def steering_success(
        self, trials: SteeringTrials, generated: Int[Tensor, "n total_len"]
    ) -> Bool[Tensor, " n"]:
        """Whether each continuation (`generated`: prompt + `trials.new_tokens` tokens) is what
        the model would write in concept `trials.targets[i]`.

        Returns:
            Booleans `[n]`, one per trial.

        Raises:
            NotImplementedError: in the base class (a task without a steering measure).
        """
        raise NotImplementedError(f"Task {self.name!r} has no steering measure.")

    # -- saving -----------------------------------------------------------------------------

    @abstractmethod
    def to_dict(self) -> dict[str, Any]:
        """JSON-ready; includes "name" (the registry key) and whatever `from_dict` needs."""

    @classmethod
    @abstractmethod
    def from_dict(cls, data: dict[str, Any]) -> Task:
        """The task `to_dict` describes (`data` includes "name")."""

    # -- what `tl-codebook compare --task NAME` needs (optional) ----------------------------

    @classmethod
    def train_default_model(
        cls,
        out_dir: str | Path,
        steps: int,
        seed: int = 0,
        device: str = "cpu",
        progress: bool = True,
    ) -> tuple[nn.Module, Task]:
        """Train the task's small default model, save it under `out_dir` (so `load_model` can
        reopen it), and return it with its task.

        Raises:
            NotImplementedError: in the base class (a task without a default model).
        """
        raise NotImplementedError(f"Task {cls.name!r} has no default model.")

    @classmethod
    def load_model(cls, model_dir: str | Path, device: str = "cpu") -> tuple[nn.Module, Task]:
        """Reopen a model saved by `train_default_model` (or the task's own experiment).

        Raises:
            NotImplementedError: in the base class (a task that cannot load models).
        """
        raise NotImplementedError(f"Task {cls.name!r} cannot load a model directory.")


# -- the registry ---------------------------------------------------------------------------

TASKS: dict[str, str] = {"tokfsm": "tl_codebook.fsm.task:TokFSMTask"}
"""Task name -> "module:Class", imported on first use (so naming a task costs nothing)."""


def register_task(name: str, target: str | type[Task]) -> None:
    """Make `name` a task name: `target` is a `Task` subclass or its "module:Class" path.

    A path is imported only when the task is first used (`task_class`), so registering costs
    nothing and a wrong path is reported then. Registering a name again replaces it.
    """
    if not isinstance(target, str):
        target = f"{target.__module__}:{target.__qualname__}"
    TASKS[name] = target


def task_class(name: str) -> type[Task]:
    """The `Task` subclass registered as `name`.

    Raises:
        ValueError: for a name that is not registered (listing the registered ones).
        TypeError: if the registered path does not name a `Task` subclass.
        ImportError: (or AttributeError) if the registered module or class cannot be found.
    """
    check_choice("task", name, TASKS)
    module, _, attribute = TASKS[name].partition(":")
    cls = getattr(importlib.import_module(module), attribute)
    if not (isinstance(cls, type) and issubclass(cls, Task)):
        raise TypeError(f"Task {name!r} is registered as {TASKS[name]!r}, which is not a Task.")
    return cls


def task_from_dict(data: dict[str, Any]) -> Task:
    """Reopen a task from its `to_dict()` (e.g. read from a store's metadata).

    Raises:
        ValueError: for a non-dict or one without "name", an unregistered name, or what the
            task's `from_dict` refuses.
    """
    if not isinstance(data, dict) or "name" not in data:
        raise ValueError(f"A task description must be a dict with a 'name', got {data!r:.80}.")
    return task_class(data["name"]).from_dict(data)


# -- generation -----------------------------------------------------------------------------

TokensToLogits = Callable[[Tensor], Tensor]
"""Anything mapping `Int[Tensor, "batch pos"]` tokens to `Float[Tensor, "batch pos vocab"]`."""


def model_device(model: TokensToLogits) -> torch.device:
    """The device of a module's first parameter (CPU for plain callables)."""
    if isinstance(model, nn.Module):
        for tensor in model.parameters():
            return tensor.device
    return torch.device("cpu")


@contextlib.contextmanager
def evaluating(model: TokensToLogits) -> Iterator[None]:
    """Eval mode and no gradients for the duration; restores the module's training flag."""
    was_training = isinstance(model, nn.Module) and model.training
    if isinstance(model, nn.Module):
        model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        if was_training and isinstance(model, nn.Module):
            model.train()


def checked_logits(
    model: TokensToLogits, tokens: Int[Tensor, "batch pos"], min_vocab: int = 1
) -> Float[Tensor, "batch pos vocab"]:
    """`model(tokens)` as float32, checked to be `[batch, pos, vocab >= min_vocab]`.

    The tokens are moved to the model's device first (`model_device`).

    Raises:
        ValueError: if the logits are not `[batch, pos, vocab]` for tokens `[batch, pos]`, or
            the vocabulary is smaller than `min_vocab`.
    """
    logits = model(tokens.to(model_device(model)))
    if logits.ndim != 3 or tuple(logits.shape[:2]) != tuple(tokens.shape):
        raise ValueError(
            f"model must return logits of shape (batch, pos, vocab) = ({tokens.shape[0]}, "
            f"{tokens.shape[1]}, vocab); got {tuple(logits.shape)}."
        )
    if logits.shape[-1] < min_vocab:
        raise ValueError(
            f"model's vocabulary ({logits.shape[-1]}) is smaller than the task's ({min_vocab})."
        )
    return logits.float()


def sample_sequences(
    model: TokensToLogits,
    prompts: Int[Tensor, "batch prompt_len"],
    seq_len: int,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
) -> Int[Tensor, "batch seq_len"]:
    """Extend `prompts` to `seq_len` tokens by sampling one token per full forward pass.

    No KV cache: each step re-runs the whole prefix, so an intervention at a fixed position
    (a hook, `force_codes(positions=...)`) acts the same at every step. `temperature=0` takes
    the argmax. Sampling happens on the CPU with `generator`, so results do not depend on the
    model's device.

    Args:
        model: maps tokens `[batch, pos]` to logits `[batch, pos, vocab]` (run in eval mode,
            without gradients).
        prompts: integer token ids `[batch, prompt_len]`.
        seq_len: the length to extend to, prompt included.
        temperature: softmax temperature; 0 for greedy decoding.
        generator: a CPU generator for reproducible sampling.

    Returns:
        Token ids `[batch, seq_len]` on the CPU: the prompts, then the sampled tokens.

    Raises:
        ValueError: for a negative temperature, `seq_len` not above the prompt length, or
            logits of the wrong shape.
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}.")
    if seq_len <= prompts.shape[1]:
        raise ValueError(f"seq_len={seq_len} must exceed the prompt length {prompts.shape[1]}.")
    tokens = prompts.cpu()
    with evaluating(model):
        for _ in range(seq_len - prompts.shape[1]):
            last = checked_logits(model, tokens)[:, -1].cpu()
            if temperature == 0:
                next_token = last.argmax(dim=-1, keepdim=True)
            else:
                probs = torch.softmax(last / temperature, dim=-1)
                next_token = torch.multinomial(probs, 1, generator=generator)
            tokens = torch.cat([tokens, next_token], dim=1)
    return tokens


def check_split(split: str) -> str:
    """Return `split` if it is one of `SPLITS`.

    Raises:
        ValueError: for any other split (naming the valid ones).
    """
    return check_choice("split", split, SPLITS)


__all__ = [
    "SPLITS",
    "TASKS",
    "SteeringTrials",
    "Task",
    "TokensToLogits",
    "check_split",
    "checked_logits",
    "evaluating",
    "model_device",
    "register_task",
    "sample_sequences",
    "task_class",
    "task_from_dict",
]
