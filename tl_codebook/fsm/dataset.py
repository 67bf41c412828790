"""Endless, seeded streams of TokFSM token sequences, and per-position state labels.

Training reads the stream; evaluation reads a fixed held-out tensor; concept analysis labels each
position with the state that is known there.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from jaxtyping import Int
from torch import Tensor
from torch.utils.data import IterableDataset, get_worker_info

from tl_codebook.fsm.machine import FSM

_TRAIN_STREAM = 0
_HELD_OUT = 1


def _generator(seed: int, *spawn_key: int) -> torch.Generator:
    """A generator for stream `spawn_key` of `seed`; distinct keys give independent streams."""
    state = np.random.SeedSequence(seed, spawn_key=spawn_key).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


class TokFSMDataset(IterableDataset):
    """Endless stream of `Int[Tensor, "seq_len"]`: BOS + digits of a random walk, cut at seq_len.

    Each walk starts at a uniformly random state. Every new iterator restarts the stream from
    `seed`, so a seeded instance is reproducible. In a `DataLoader`, worker `i` reads stream `i`
    of the seed (the main process reads stream 0, so one worker gives the same data as none).
    Sequences are drawn `chunk_size` at a time; the stream depends on `chunk_size`.

    Args:
        fsm: the machine the walks follow.
        seq_len: tokens per sequence, BOS included (a trailing state may be cut short).
        seed: seed of the stream (>= 0).
        chunk_size: sequences drawn at once.

    Raises:
        ValueError: for `seq_len < 2`, a negative seed or `chunk_size < 1` (or non-integers).
    """

    def __init__(self, fsm: FSM, seq_len: int = 128, seed: int = 0, chunk_size: int = 256):
        if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
            raise ValueError(f"seq_len must be an integer >= 2 (BOS and a digit), got {seq_len!r}.")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be an integer >= 0, got {seed!r}.")
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be an integer >= 1, got {chunk_size!r}.")
        super().__init__()
        self.fsm = fsm
        self.seq_len = seq_len
        self.seed = seed
        self.chunk_size = chunk_size

    def _sequences(
        self, n_sequences: int, generator: torch.Generator
    ) -> Int[Tensor, "n_sequences seq_len"]:
        n_walk_states = -(-(self.seq_len - 1) // self.fsm.digits_per_state)
        walks = self.fsm.sample_trajectories(n_sequences, n_walk_states, generator)
        return self.fsm.trajectory_to_tokens(walks)[:, : self.seq_len]

    def _chunks(self) -> Iterator[Tensor]:
        worker = get_worker_info()
        generator = _generator(self.seed, _TRAIN_STREAM, 0 if worker is None else worker.id)
        while True:
            yield self._sequences(self.chunk_size, generator)

    def __iter__(self) -> Iterator[Tensor]:
        for chunk in self._chunks():
            yield from chunk

    def batches(self, batch_size: int) -> Iterator[Tensor]:
        """Endless `Int[Tensor, "batch seq_len"]` batches: the stream of `iter(self)`, grouped.

        Raises:
            ValueError: for `batch_size` that is not an integer >= 1 (when iteration starts).
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}.")
        buffer: list[Tensor] = []
        buffered = 0
        for chunk in self._chunks():
            buffer.append(chunk)
            buffered += len(chunk)
            if buffered < batch_size:
                continue
            rows = torch.cat(buffer)
            n_full = len(rows) // batch_size * batch_size
            yield from rows[:n_full].split(batch_size)
            buffer, buffered = [rows[n_full:]], len(rows) - n_full

    def held_out(self, n_sequences: int, seed: int = 0) -> Int[Tensor, "n_sequences seq_len"]:
        """A fixed evaluation set, drawn from a stream no training stream of any seed uses.

        Returns:
            Token ids `[n_sequences, seq_len]`, the same for the same `seed`.

        Raises:
            ValueError: for `n_sequences < 1` or a negative seed (or non-integers).
        """
        if isinstance(n_sequences, bool) or not isinstance(n_sequences, int) or n_sequences < 1:
            raise ValueError(f"n_sequences must be an integer >= 1, got {n_sequences!r}.")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be an integer >= 0, got {seed!r}.")
        return self._sequences(n_sequences, _generator(seed, _HELD_OUT))


def determined_states(
    fsm: FSM, tokens: Int[Tensor, "*batch pos"], hold: bool = False
) -> Int[Tensor, "*batch pos"]:
    """For each position, the state known there: the state whose last digit sits at that position.

    Position 0 is BOS; state `i` ends at position `(i + 1) * digits_per_state`. Other positions
    are -1, as are positions ending a digit group that is not a valid state. With `hold=True`,
    a position inside a state's digits instead keeps the most recently completed state (BOS and
    the first state's earlier digits stay -1), i.e. "the current state" of the walk.

    Args:
        fsm: the machine that wrote the tokens.
        tokens: token ids `[*batch, pos]`, each sequence starting with BOS.
        hold: label every position with the most recently completed state.

    Returns:
        State labels `[*batch, pos]` (shape of `tokens`), -1 where no state is known.

    Raises:
        ValueError: if a sequence is empty or does not start with BOS.
    """
    states = fsm.tokens_to_states(tokens, starts_with_bos=True)
    d = fsm.digits_per_state
    n_pos = tokens.shape[-1]
    labels = torch.full_like(tokens, -1)
    ends = torch.arange(1, states.shape[-1] + 1, device=tokens.device) * d
    labels[..., ends] = states
    if not hold:
        return labels
    positions = torch.arange(n_pos, device=tokens.device)
    is_end = torch.zeros(n_pos, dtype=torch.bool, device=tokens.device)
    is_end[ends] = True
    last_end = torch.where(is_end, positions, 0).cummax(dim=0).values
    held = labels[..., last_end]
    return torch.where(last_end > 0, held, -1)
