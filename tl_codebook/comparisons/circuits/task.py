"""What a circuit-discovery method needs from a task: a model, prompt pairs, a metric, the truth.

A `CircuitTask` is data, not a code path: every method (codes, patching, attribution, EAP,
ACDC, random) takes one and never asks which task it is. The graph it scores is the
attention-only transformer's: nodes are the attention heads, named "L{layer}H{head}"; edges
go from a sender ("input", the token + position embeddings, or a head) to a receiver in a later
layer (a head, through its query/key/value input, or "logits", through the final residual
stream), named "sender->receiver". The ground truth, where a task knows it, is a set of nodes
and a set of edges in those names.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens import HookedTransformer

INPUT = "input"
"""The sender node holding the token and position embeddings."""
LOGITS = "logits"
"""The receiver node that reads the final residual stream (the unembedding)."""

Metric = Callable[[Float[Tensor, "n pos d_vocab"], Int[Tensor, "n pos"]], Float[Tensor, " n"]]
"""A task metric: from the logits of a run and the clean tokens it should have answered, one
value per prompt, higher meaning "the task is done" (e.g. a logit difference). It must be
differentiable in the logits: attribution methods take its gradient."""

_HEAD = re.compile(r"^L(\d+)H(\d+)$")


def head_name(layer: int, head: int) -> str:
    """The node name of head `head` in layer `layer`: "L{layer}H{head}"."""
    return f"L{layer}H{head}"


def parse_head(name: str) -> tuple[int, int]:
    """(layer, head) of a node name "L{layer}H{head}".

    Raises:
        ValueError: for a name of another form.
    """
    match = _HEAD.match(name)
    if match is None:
        raise ValueError(
            f"{name!r} is not a head name: head names read 'L<layer>H<head>', e.g. 'L1H3'."
        )
    return int(match.group(1)), int(match.group(2))


def edge_name(sender: str, receiver: str) -> str:
    """The edge name "sender->receiver"."""
    return f"{sender}->{receiver}"


def model_heads(model: HookedTransformer) -> list[str]:
    """Every head of `model`, layer by layer: the nodes a method scores."""
    return [
        head_name(layer, head)
        for layer in range(model.cfg.n_layers)
        for head in range(model.cfg.n_heads)
    ]


def model_edges(model: HookedTransformer) -> list[str]:
    """Every edge of `model`'s graph: input or a head, into a head of a later layer or logits.

    Ordered by receiver (layer by layer, then logits), then by sender (input first).
    """
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    edges: list[str] = []
    receivers = [(layer, head_name(layer, h)) for layer in range(n_layers) for h in range(n_heads)]
    receivers.append((n_layers, LOGITS))
    for layer, receiver in receivers:
        senders = [INPUT] + [head_name(s, h) for s in range(layer) for h in range(n_heads)]
        edges.extend(edge_name(sender, receiver) for sender in senders)
    return edges


@dataclass
class CircuitTask:
    """A model, its clean and corrupted prompts, a metric and (optionally) the true circuit.

    `clean[i]` does the task and `corrupted[i]` is its counterfactual of the same length (what
    patching and resample ablation put in). `negatives`, prompts on which the task is absent,
    are what the codes method contrasts the clean prompts with; they default to `corrupted`.
    `positions`, where given, marks the positions of each clean prompt where the task acts
    (the codes method reads only those; all positions otherwise).

    Raises:
        ValueError: on construction, for clean and corrupted prompts of different shapes, a
            model that is not attention-only, positions of the wrong shape, or a true node or
            edge the model does not have (the message lists the valid ones).
    """

    name: str
    """The task's name in reports (the induction task's contains "induction")."""
    model: HookedTransformer
    """An attention-only model (`cfg.attn_only`); the methods set its hook options themselves."""
    clean: Int[Tensor, "n pos"]
    """Prompts that do the task."""
    corrupted: Int[Tensor, "n_corrupted pos_corrupted"]
    """One counterfactual per clean prompt, of the same length (checked with a message naming
    both shapes, so its axes are named apart here)."""
    metric: Metric
    """Per-prompt task metric (see `Metric`)."""
    true_nodes: frozenset[str] | None = None
    """The heads of the true circuit, or None when unknown."""
    true_edges: frozenset[str] | None = None
    """The edges of the true circuit (names from `model_edges`), or None when unknown."""
    negatives: Int[Tensor, "n_neg pos"] | None = None
    """Prompts without the task, for the codes method; None means `corrupted`."""
    positions: torch.Tensor | None = None
    """Bool [n, pos]: where the task acts in each clean prompt; None means everywhere."""
    notes: dict[str, object] = field(default_factory=dict)
    """What the task wants a report to say about it (how its truth was fixed, and so on)."""

    def __post_init__(self) -> None:
        if tuple(self.clean.shape) != tuple(self.corrupted.shape):
            raise ValueError(
                f"CircuitTask {self.name!r}: clean and corrupted prompts must have the same shape "
                f"(one counterfactual per prompt, position by position); got "
                f"{tuple(self.clean.shape)} and {tuple(self.corrupted.shape)}."
            )
        if self.clean.ndim != 2 or self.clean.shape[0] < 1:
            raise ValueError(
                f"CircuitTask {self.name!r}: prompts must be [n, pos] with n >= 1, got "
                f"{tuple(self.clean.shape)}."
            )
        if not self.model.cfg.attn_only:
            raise ValueError(
                f"CircuitTask {self.name!r}: the circuit graph is that of an attention-only model "
                f"(cfg.attn_only=True); this model has MLPs."
            )
        if self.positions is not None and tuple(self.positions.shape) != tuple(self.clean.shape):
            raise ValueError(
                f"CircuitTask {self.name!r}: positions must be Bool {tuple(self.clean.shape)}, "
                f"got {tuple(self.positions.shape)}."
            )
        heads = model_heads(self.model)
        if self.true_nodes is not None:
            self.true_nodes = frozenset(self.true_nodes)
            unknown = sorted(self.true_nodes - set(heads))
            if unknown:
                raise ValueError(
                    f"CircuitTask {self.name!r}: true node(s) {unknown} are not heads of this "
                    f"model; its heads are {heads}."
                )
        if self.true_edges is not None:
            self.true_edges = frozenset(self.true_edges)
            edges = model_edges(self.model)
            unknown = sorted(self.true_edges - set(edges))
            if unknown:
                raise ValueError(
                    f"CircuitTask {self.name!r}: true edge(s) {unknown} are not edges of this "
                    f"model's graph (sender 'input' or a head, receiver a head of a later layer "
                    f"or 'logits'; e.g. {edges[:3]})."
                )

    @property
    def n(self) -> int:
        """The number of clean/corrupted prompt pairs."""
        return int(self.clean.shape[0])

    @property
    def negative_prompts(self) -> Int[Tensor, "n_neg pos"]:
        """The prompts without the task (the corrupted ones unless `negatives` was given)."""
        return self.corrupted if self.negatives is None else self.negatives

    def subset(self, n: int) -> CircuitTask:
        """The same task on its first `n` prompt pairs (and first `n` negatives): how a method's
        score is measured against the number of examples."""
        if not 1 <= n <= self.n:
            raise ValueError(f"CircuitTask {self.name!r} has {self.n} prompts; cannot take {n}.")
        negatives = None if self.negatives is None else self.negatives[:n]
        positions = None if self.positions is None else self.positions[:n]
        return dataclasses.replace(
            self,
            clean=self.clean[:n],
            corrupted=self.corrupted[:n],
            negatives=negatives,
            positions=positions,
        )
