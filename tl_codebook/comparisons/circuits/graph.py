"""Runs of an attention-only model with some of its graph's edges ablated: the one mechanism
every circuit method and every faithfulness measure patches through.

An edge sender -> receiver carries the sender's output (the embeddings for "input", a head's
`attn.hook_result` for a head) into the receiver's input (a head's `hook_q/k/v_input`, or the
final residual stream for "logits"). Removing the edge hands the receiver the sender's
*ablated* output instead: its output on the corrupted prompt (resample ablation, what patching
means) or its mean over the corrupted prompts (mean ablation). Senders inside a run still compute
from their own, possibly patched, inputs, as in ACDC and MIB. Hooks only: the model is the
user's TransformerLens model, with `use_attn_result` and `use_split_qkv_input` switched on.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from transformer_lens import HookedTransformer

from tl_codebook.comparisons.circuits.task import (
    INPUT,
    LOGITS,
    CircuitTask,
    edge_name,
    model_heads,
    parse_head,
)
from tl_codebook.configs import check_choice

FwdHooks = list[tuple[str | Callable[..., Any], Callable[..., Any]]]
"""Forward hooks as `HookedRootModule.hooks` takes them: (hook name, function) pairs."""

ABLATIONS = ("resample", "mean")
"""How a removed edge's sender output is replaced: by its output on the paired corrupted prompt
("resample", the patching convention) or by its mean over all corrupted prompts ("mean")."""


@dataclass
class PassCounter:
    """Forward and backward passes a method spent (each over the whole prompt batch)."""

    forward: int = 0
    backward: int = 0


@dataclass
class CircuitGraph:
    """The nodes and edges of `task.model`'s graph, the clean and ablated sender outputs, and
    patched runs over the task's prompts.

    Build one with `CircuitGraph.build(task, ablation)`; it runs the model once on the clean
    and once on the corrupted prompts (counted in `passes`).
    """

    task: CircuitTask
    ablation: str
    senders: list[str]
    receivers: list[str]
    valid: Bool[Tensor, "n_senders n_receivers"]
    """True where sender -> receiver is an edge (the sender sits in an earlier layer)."""
    ablated: Float[Tensor, "n_senders batch pos d_model"]
    clean_outputs: Float[Tensor, "n_senders batch pos d_model"]
    passes: PassCounter = field(default_factory=PassCounter)
    _baselines: dict[str, float] = field(default_factory=dict, repr=False)

    @classmethod
    def build(cls, task: CircuitTask, ablation: str = "resample") -> CircuitGraph:
        """The graph of `task.model` with sender outputs cached under `ablation`.

        Raises:
            ValueError: for an ablation not in `ABLATIONS`.
        """
        check_choice("ablation", ablation, ABLATIONS)
        model = task.model
        prepare_model(model)
        heads = model_heads(model)
        senders = [INPUT, *heads]
        receivers = [*heads, LOGITS]
        layer_of = {INPUT: -1, LOGITS: model.cfg.n_layers}
        layer_of.update({h: parse_head(h)[0] for h in heads})
        valid = torch.tensor(
            [[layer_of[s] < layer_of[r] for r in receivers] for s in senders], dtype=torch.bool
        )
        passes = PassCounter()
        clean = sender_outputs(model, task.clean)
        corrupted = sender_outputs(model, task.corrupted)
        passes.forward += 2
        if ablation == "mean":
            corrupted = corrupted.mean(dim=1, keepdim=True).expand_as(corrupted).contiguous()
        return cls(task, ablation, senders, receivers, valid, corrupted, clean, passes)

    @property
    def edges(self) -> list[str]:
        """Every edge's name, sender-major (the order of `edge_index`)."""
        return [edge_name(self.senders[s], self.receivers[r]) for s, r in self.edge_index]

    @property
    def edge_index(self) -> list[tuple[int, int]]:
        """(sender index, receiver index) of every edge, sender-major."""
        return [(int(s), int(r)) for s, r in self.valid.nonzero().tolist()]

    def full(self) -> Bool[Tensor, "n_senders n_receivers"]:
        """The mask keeping every edge (the whole model)."""
        return self.valid.clone()

    def empty(self) -> Bool[Tensor, "n_senders n_receivers"]:
        """The mask keeping no edge (every receiver reads only ablated senders)."""
        return torch.zeros_like(self.valid)

    def mask_of_edges(self, edges: set[str] | list[str]) -> Bool[Tensor, "n_senders n_receivers"]:
        """The mask keeping exactly the named edges."""
        keep = self.empty()
        wanted = set(edges)
        for (s, r), name in zip(self.edge_index, self.edges, strict=True):
            if name in wanted:
                keep[s, r] = True
        return keep

    def mask_of_nodes(self, nodes: set[str] | list[str]) -> Bool[Tensor, "n_senders n_receivers"]:
        """The mask of a node circuit: every edge out of the input and out of the kept heads
        (the other heads' outputs are ablated wherever they are read)."""
        kept = set(nodes) | {INPUT}
        rows = torch.tensor([s in kept for s in self.senders], dtype=torch.bool)
        return self.valid & rows[:, None]

    def metric(self, keep: Bool[Tensor, "n_senders n_receivers"] | None = None) -> float:
        """The task metric averaged over prompts, with only the edges in `keep` (None: all)."""
        with torch.no_grad():
            return float(self.per_prompt_metric(keep).mean())

    def baseline(self, which: str) -> float:
        """The metric of a reference circuit, run once per graph and reused by every
        faithfulness curve: "full" (the model), "input_only" (every head ablated: the node
        level's empty circuit) or "empty" (every edge ablated: the edge level's)."""
        masks = {"full": None, "input_only": self.mask_of_nodes([]), "empty": self.empty()}
        check_choice("baseline circuit", which, tuple(masks))
        if which not in self._baselines:
            self._baselines[which] = self.metric(masks[which])
        return self._baselines[which]

    def per_prompt_metric(
        self, keep: Bool[Tensor, "n_senders n_receivers"] | None = None
    ) -> Float[Tensor, " n"]:
        """The task metric of each prompt with only the edges in `keep` (None: all) — one
        forward pass."""
        logits = self.run(keep)
        return self.task.metric(logits, self.task.clean)

    def run(self, keep: Bool[Tensor, "n_senders n_receivers"] | None = None) -> Tensor:
        """Logits of the clean prompts with the edges outside `keep` ablated (one forward)."""
        self.passes.forward += 1
        if keep is None:
            return self.task.model(self.task.clean)
        removed = (self.valid & ~keep).to(self.ablated.dtype)
        with patched_edges(self.task.model, removed, self.ablated):
            return self.task.model(self.task.clean)


def prepare_model(model: HookedTransformer) -> None:
    """Switch on the hook points the graph reads: per-head results and per-head q/k/v inputs.

    Both leave the model's outputs unchanged (they split sums TransformerLens otherwise fuses).
    """
    if not model.cfg.use_attn_result:
        model.set_use_attn_result(True)
    if not model.cfg.use_split_qkv_input:
        model.set_use_split_qkv_input(True)


def sender_outputs(
    model: HookedTransformer, tokens: Int[Tensor, "batch pos"]
) -> Float[Tensor, "n_senders batch pos d_model"]:
    """What each sender writes into the residual stream on `tokens`: the embeddings, then each
    head's output, layer by layer (one forward pass, no gradients)."""
    names = ["blocks.0.hook_resid_pre"] + [
        f"blocks.{layer}.attn.hook_result" for layer in range(model.cfg.n_layers)
    ]
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=names)
    outputs = [cache["blocks.0.hook_resid_pre"][None]]
    for layer in range(model.cfg.n_layers):
        outputs.append(cache[f"blocks.{layer}.attn.hook_result"].permute(2, 0, 1, 3))
    return torch.cat(outputs, dim=0)


@contextmanager
def patched_edges(
    model: HookedTransformer,
    removed: Float[Tensor, "n_senders n_receivers"],
    ablated: Float[Tensor, "n_senders batch pos d_model"],
) -> Iterator[None]:
    """Hooks under which each receiver reads, for every removed edge, the sender's ablated
    output in place of its current one.

    `removed[s, r]` is 1 for an edge to remove (0 elsewhere; a fraction interpolates, which
    integrated gradients and tests use). The current outputs are recorded as the forward runs,
    so a sender downstream of patched edges passes its own patched output on.
    """
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    current: list[Tensor] = []

    def record_input(value: Tensor, hook: object) -> Tensor:
        current.clear()
        current.append(value)
        return value

    def record_result(value: Tensor, hook: object) -> Tensor:
        current.extend(value.unbind(dim=2))
        return value

    def delta(receivers: slice) -> Tensor:
        n = len(current)
        diff = torch.stack(current) - ablated[:n]
        return torch.einsum("sbpd,sr->bprd", diff, removed[:n, receivers])

    def patch_heads(layer: int) -> Callable[[Tensor, object], Tensor]:
        def hook(value: Tensor, hook: object) -> Tensor:
            return value - delta(slice(layer * n_heads, (layer + 1) * n_heads))

        return hook

    def patch_logits(value: Tensor, hook: object) -> Tensor:
        return value - delta(slice(n_layers * n_heads, n_layers * n_heads + 1))[:, :, 0]

    hooks: FwdHooks = [("blocks.0.hook_resid_pre", record_input)]
    for layer in range(n_layers):
        for kind in ("q", "k", "v"):
            hooks.append((f"blocks.{layer}.hook_{kind}_input", patch_heads(layer)))
        hooks.append((f"blocks.{layer}.attn.hook_result", record_result))
    hooks.append((f"blocks.{n_layers - 1}.hook_resid_post", patch_logits))
    with model.hooks(fwd_hooks=hooks):
        yield
