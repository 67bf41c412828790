"""The TokFSM finite state machine: random seeded out-edges, and states written as base-b digits.

It defines the task's ground truth (which transitions are valid) and its token format, so the
dataset, the metrics and the concept labels all agree on one encoding.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from tl_codebook.configs import dataclass_from_dict

FORMAT_NAME = "tl_codebook.fsm"
FORMAT_VERSION = 1


def _check_int(owner: str, name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{owner}.{name} must be an integer >= {minimum}, got {value!r}.")


@dataclass(frozen=True)
class FSMConfig:
    """Size, edge count, digit base and seed of a TokFSM; the paper uses the defaults.

    `seed` only matters to `FSM.generate`: an FSM built from explicit transitions keeps it as a
    label.

    Raises:
        ValueError: on construction, for a size that is not an integer >= 1 (`base` >= 2), a
            non-integer seed, or `n_edges > n_states`.
    """

    n_states: int = 100
    """States of the machine."""
    n_edges: int = 10
    """Distinct out-edges per state (equally likely successors)."""
    base: int = 10
    """Digit base states are written in (token ids 0..base-1; `base` is BOS)."""
    seed: int = 0
    """Seed of the random transitions drawn by `FSM.generate`."""

    def __post_init__(self) -> None:
        _check_int("FSMConfig", "n_states", self.n_states, 1)
        _check_int("FSMConfig", "n_edges", self.n_edges, 1)
        _check_int("FSMConfig", "base", self.base, 2)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"FSMConfig.seed must be an integer, got {self.seed!r}.")
        if self.n_edges > self.n_states:
            raise ValueError(
                f"FSMConfig.n_edges={self.n_edges} must be between 1 and n_states={self.n_states}: "
                "each state's out-edges go to distinct states."
            )

    def to_dict(self) -> dict[str, Any]:
        """The config as a JSON-ready dict (the inverse of `from_dict`)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FSMConfig:
        """Build a config from a dict, refusing missing and unknown keys.

        Raises:
            ValueError: for a missing or unknown key, a value of the wrong type, or any check
                of the config.
        """
        return dataclass_from_dict(cls, data, require_all=True)


class FSM:
    """A finite state machine whose states each have `n_edges` distinct, equally likely successors.

    Token format: state `s` is written as `digits_per_state` base-`base` digits, most significant
    first; token ids `0..base-1` are digits and `base` is BOS. A sequence is BOS followed by the
    digits of consecutive states.

    `FSM.generate(cfg)` draws, for every state, `n_edges` distinct targets uniformly from all
    `n_states` states (self-loops allowed, as a uniformly random choice would give them), with a
    `torch.Generator` seeded by `cfg.seed`. `FSM(cfg, transitions)` builds a hand-made machine.

    Args:
        cfg: the machine's sizes and base.
        transitions: integer targets `[n_states, n_edges]`: row `s` lists the successors of
            state `s` (kept sorted).

    Raises:
        ValueError: for transitions of another shape, a target outside `[0, n_states)`, or a
            state with repeated out-edges.
    """

    def __init__(self, cfg: FSMConfig, transitions: Int[Tensor, "n_states n_edges"]):
        expected = (cfg.n_states, cfg.n_edges)
        if tuple(transitions.shape) != expected:
            raise ValueError(
                f"transitions must have shape (n_states, n_edges)={expected}, "
                f"got {tuple(transitions.shape)}."
            )
        transitions = transitions.detach().to(device="cpu", dtype=torch.long)
        out_of_range = (transitions < 0) | (transitions >= cfg.n_states)
        if out_of_range.any():
            bad = transitions[out_of_range][0].item()
            raise ValueError(
                f"transition targets must be states in [0, {cfg.n_states - 1}], got {bad}."
            )
        ordered = transitions.sort(dim=1).values
        repeated = (ordered[:, 1:] == ordered[:, :-1]).any(dim=1)
        if repeated.any():
            state = int(repeated.nonzero()[0].item())
            raise ValueError(
                f"state {state} has repeated out-edges {transitions[state].tolist()}; "
                "out-edges must be distinct."
            )
        self.cfg = cfg
        self.transitions = ordered
        matrix = torch.zeros(cfg.n_states, cfg.n_states, dtype=torch.bool)
        matrix.scatter_(1, ordered, True)
        self._transition_matrix = matrix
        self._powers = cfg.base ** torch.arange(self.digits_per_state - 1, -1, -1)

    @classmethod
    def generate(cls, cfg: FSMConfig) -> FSM:
        """Draw a random FSM; the same config (seed included) always gives the same machine."""
        generator = torch.Generator().manual_seed(cfg.seed)
        rows = [
            torch.randperm(cfg.n_states, generator=generator)[: cfg.n_edges]
            for _ in range(cfg.n_states)
        ]
        return cls(cfg, torch.stack(rows))

    # ---- sizes and token format -------------------------------------------------------------

    @property
    def n_states(self) -> int:
        """States of the machine (`cfg.n_states`)."""
        return self.cfg.n_states

    @property
    def n_edges(self) -> int:
        """Out-edges per state (`cfg.n_edges`)."""
        return self.cfg.n_edges

    @property
    def base(self) -> int:
        """The digit base of the token format (`cfg.base`)."""
        return self.cfg.base

    @property
    def digits_per_state(self) -> int:
        """ceil(log_base(n_states)), at least 1: enough digits to write every state."""
        digits = 1
        while self.base**digits < self.n_states:
            digits += 1
        return digits

    @property
    def bos_token(self) -> int:
        """The BOS token id: `base` (right after the digits)."""
        return self.base

    @property
    def vocab_size(self) -> int:
        """`base` digits plus BOS."""
        return self.base + 1

    @property
    def transition_matrix(self) -> Bool[Tensor, "n_states n_states"]:
        """`matrix[a, b]` is True iff `a -> b` is an edge (a copy: safe to modify)."""
        return self._transition_matrix.clone()

    def _check_state(self, state: int) -> None:
        if isinstance(state, bool) or not isinstance(state, int):
            raise ValueError(f"a state must be an int, got {state!r}.")
        if not 0 <= state < self.n_states:
            raise ValueError(f"state must be in [0, {self.n_states - 1}], got {state}.")

    def state_to_tokens(self, state: int) -> list[int]:
        """The digits of `state`, most significant first (e.g. 7 -> [0, 7] for 100 states).

        Raises:
            ValueError: for a non-integer state or one outside `[0, n_states)`.
        """
        self._check_state(state)
        return [(state // p) % self.base for p in self._powers.tolist()]

    def trajectory_to_tokens(
        self, states: Int[Tensor, "*batch n"], add_bos: bool = True
    ) -> Int[Tensor, "*batch pos"]:
        """Write trajectories as tokens: BOS (unless add_bos=False), then each state's digits.

        Args:
            states: state ids `[*batch, n]`.
            add_bos: start every sequence with BOS.

        Returns:
            Token ids `[*batch, pos]`, `pos = n * digits_per_state` (+1 with BOS).

        Raises:
            ValueError: for a state outside `[0, n_states)`.
        """
        if ((states < 0) | (states >= self.n_states)).any():
            raise ValueError(f"states must be in [0, {self.n_states - 1}].")
        digits = (states.unsqueeze(-1) // self._powers.to(states.device)) % self.base
        tokens = digits.flatten(start_dim=-2)
        if add_bos:
            bos = torch.full_like(tokens[..., :1], self.bos_token)
            tokens = torch.cat([bos, tokens], dim=-1)
        return tokens

    def tokens_to_states(
        self, tokens: Int[Tensor, "*batch pos"] | Sequence[int], starts_with_bos: bool = True
    ) -> Int[Tensor, "*batch n"]:
        """Parse token sequences into the states they write, dropping a trailing partial state.

        With `starts_with_bos`, position 0 must be BOS and is skipped. A group of
        `digits_per_state` tokens that is not a state (it holds a non-digit token such as BOS,
        or writes a number >= n_states) parses to -1.

        Returns:
            State ids `[*batch, n]`, `n = (pos - 1) // digits_per_state` (`pos // ...` without
                BOS); -1 for a group that is no state.

        Raises:
            ValueError: with `starts_with_bos`, if a sequence is empty or does not start with
                BOS.
        """
        if not isinstance(tokens, Tensor):
            tokens = torch.tensor(list(tokens), dtype=torch.long)
        if starts_with_bos:
            if tokens.shape[-1] == 0 or not (tokens[..., 0] == self.bos_token).all():
                raise ValueError(
                    f"every sequence must start with BOS (token {self.bos_token}); "
                    "pass starts_with_bos=False to parse digits only."
                )
            tokens = tokens[..., 1:]
        d = self.digits_per_state
        n = tokens.shape[-1] // d
        chunks = tokens[..., : n * d].unflatten(-1, (n, d))
        is_digit = ((chunks >= 0) & (chunks < self.base)).all(dim=-1)
        value = (chunks.clamp(0, self.base - 1) * self._powers.to(tokens.device)).sum(dim=-1)
        return torch.where(is_digit & (value < self.n_states), value, -1)

    # ---- transitions and walks --------------------------------------------------------------

    def is_valid_transition(self, from_state: int, to_state: int) -> bool:
        """Whether `from_state -> to_state` is an edge of the machine.

        Raises:
            ValueError: for a non-integer state or one outside `[0, n_states)`.
        """
        self._check_state(from_state)
        self._check_state(to_state)
        return bool(self._transition_matrix[from_state, to_state])

    def sample_trajectories(
        self,
        n_trajectories: int,
        length: int,
        generator: torch.Generator | None = None,
    ) -> Int[Tensor, "n_trajectories length"]:
        """Random walks from uniformly random start states, each step a uniform out-edge.

        Returns:
            State ids `[n_trajectories, length]`.

        Raises:
            ValueError: for `n_trajectories < 0` or `length < 1` (or non-integers).
        """
        _check_int("sample_trajectories", "n_trajectories", n_trajectories, 0)
        _check_int("sample_trajectories", "length", length, 1)
        states = torch.empty(n_trajectories, length, dtype=torch.long)
        states[:, 0] = torch.randint(self.n_states, (n_trajectories,), generator=generator)
        edges = torch.randint(self.n_edges, (n_trajectories, length - 1), generator=generator)
        for step in range(1, length):
            states[:, step] = self.transitions[states[:, step - 1], edges[:, step - 1]]
        return states

    def sample_trajectory(
        self, length: int, generator: torch.Generator | None = None
    ) -> Int[Tensor, " length"]:
        """One random walk of `length` states from a uniformly random start state."""
        return self.sample_trajectories(1, length, generator)[0]

    # ---- persistence ------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The machine as JSON-ready data: a format tag and version, the config, the transitions."""
        return {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "config": self.cfg.to_dict(),
            "transitions": self.transitions.tolist(),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FSM:
        """The machine `to_dict` describes.

        Raises:
            ValueError: for data of another format or version, a bad config, or transitions
                the machine refuses.
        """
        if data.get("format") != FORMAT_NAME or data.get("version") != FORMAT_VERSION:
            raise ValueError(
                f"not a saved FSM: expected format={FORMAT_NAME!r} version={FORMAT_VERSION}, "
                f"got format={data.get('format')!r} version={data.get('version')!r}."
            )
        cfg = FSMConfig.from_dict(data["config"])
        return cls(cfg, torch.tensor(data["transitions"], dtype=torch.long))

    def save(self, path: str | Path) -> None:
        """Write config and transitions as JSON."""
        Path(path).write_text(json.dumps(self.to_dict()))

    @classmethod
    def load(cls, path: str | Path) -> FSM:
        """Read a machine written by `save`.

        Raises:
            OSError: if the file cannot be read.
            ValueError: for a file that is not JSON (json.JSONDecodeError) or not a saved FSM.
        """
        return cls.from_dict(json.loads(Path(path).read_text()))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, FSM):
            return NotImplemented
        return self.cfg == other.cfg and torch.equal(self.transitions, other.transitions)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        c = self.cfg
        return f"FSM(n_states={c.n_states}, n_edges={c.n_edges}, base={c.base}, seed={c.seed})"
