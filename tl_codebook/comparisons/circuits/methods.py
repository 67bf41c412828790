"""Circuit-discovery methods, one score convention for all: a score per head (higher: more part
of the circuit) and, where the method has them, a score per edge.

Every method but codes reads the task through one `CircuitGraph` (its cached clean and ablated
sender outputs and its patched runs), so all share prompts, metric and ablation:

- `codes`: codebooks on each layer's `attn.hook_z` (one group per head), fitted to the clean
  activations of positive (clean) and negative prompts and *not* placed in the model; a head's
  score is the total variation between its code histograms on positive and negative prompts
  (O'Neill & Bui's count of codes unique to positives is recorded beside); an edge's score is
  the total variation of the pair's joint (co-occurring) codes. It never runs a patched model.
- `activation_patching`: exact; the metric's change when one head's output (or one edge) is
  ablated, one forward pass per head and per edge.
- `attribution_patching`: the first-order (gradient) estimate of the same node effects: one
  forward and one backward pass.
- `eap`: edge attribution patching, the gradient at each receiver's input times the sender's
  output change; node scores sum the absolute scores of a head's outgoing edges.
- `eap_ig`: EAP with integrated gradients: gradients averaged over inputs interpolated from
  the ablated to the clean embeddings.
- `acdc`: ACDC's greedy pass from the logits back, removing each edge whose removal moves the
  metric by less than a threshold; an edge's score is the change it made when tested.
- `random`: seeded uniform scores, the chance baseline.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from tl_codebook.codebook import Codebook, CodebookConfig
from tl_codebook.comparisons.circuits.graph import CircuitGraph, FwdHooks, PassCounter
from tl_codebook.comparisons.circuits.task import INPUT, LOGITS, CircuitTask, edge_name
from tl_codebook.configs import check_choice
from tl_codebook.training.codebook_init import initialise_codebook

METHODS = (
    "codes",
    "activation_patching",
    "attribution_patching",
    "eap",
    "eap_ig",
    "acdc",
    "random",
)
"""The circuit-discovery methods, by the names reports use."""


@dataclass
class MethodOptions:
    """Knobs of the methods, with the defaults the comparison uses."""

    num_codes: int = 32
    """Codes per head of the codes method's codebooks (fewer when there are fewer rows)."""
    ig_steps: int = 5
    """Interpolation steps of EAP-IG."""
    acdc_threshold: float = 0.01
    """ACDC's threshold, as a fraction of |m(full) - m(empty)|."""
    seed: int = 0
    """Seed of the codes method's k-means and of the random baseline."""
    kmeans_iters: int = 10
    """Lloyd passes of the codes method's k-means (the codes need to separate, not converge)."""


@dataclass
class CircuitScores:
    """One method's scores on one task, and what they cost."""

    method: str
    nodes: dict[str, float]
    """Score per head ("L{layer}H{head}")."""
    edges: dict[str, float] | None
    """Score per edge ("sender->receiver"), or None for a node-only method."""
    seconds: float
    """Wall time of the method, after the shared graph was built."""
    passes: PassCounter
    """Forward and backward passes the method ran (each over the whole prompt batch)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Method-specific figures (e.g. the codes method's unique-code scores)."""


def score_circuit(
    task: CircuitTask,
    method: str,
    graph: CircuitGraph | None = None,
    options: MethodOptions | None = None,
) -> CircuitScores:
    """Score `task`'s heads (and edges) by `method`.

    `graph` is the shared graph of the task (built with resample ablation when None); methods
    that patch read its cached outputs, so building it once serves them all.

    Raises:
        ValueError: for a method not in `METHODS` (the message lists them), or a gradient
            method on a task whose metric has zero gradient everywhere.
    """
    check_choice("circuit method", method, METHODS)
    options = options or MethodOptions()
    graph = graph if graph is not None else CircuitGraph.build(task)
    before = PassCounter(graph.passes.forward, graph.passes.backward)
    start = time.perf_counter()
    nodes, edges, extra = _METHODS[method](graph, options)
    seconds = time.perf_counter() - start
    passes = PassCounter(
        graph.passes.forward - before.forward, graph.passes.backward - before.backward
    )
    if method == "codes":
        passes = PassCounter(extra.pop("forward_passes"), 0)
        # a figure for the report, not part of the scores: measured after the clock stops
        extra["metric_with_codebooks"] = _metric_with_codebooks(task, extra.pop("codebooks"))
    return CircuitScores(method, nodes, edges, seconds, passes, extra)


def _edge_dict(graph: CircuitGraph, values: Float[Tensor, "n_senders n_receivers"]) -> dict:
    return {
        name: float(values[s, r])
        for (s, r), name in zip(graph.edge_index, graph.edges, strict=True)
    }


def _nodes_from_edges(graph: CircuitGraph, values: Float[Tensor, "n_senders n_receivers"]) -> dict:
    """A head's score from its edges: the sum of the absolute scores of its outgoing edges."""
    summed = (values.abs() * graph.valid).sum(dim=1)
    return {s: float(summed[i]) for i, s in enumerate(graph.senders) if s != INPUT}


RANDOM_DRAWS = 200
"""Independent random rankings the random baseline's expected AUROC is averaged over."""


def random_scores(graph: CircuitGraph, seed: int) -> tuple[dict, dict]:
    """Uniform random node and edge scores from `seed` (one draw of the chance baseline)."""
    generator = torch.Generator().manual_seed(seed)
    heads = [s for s in graph.senders if s != INPUT]
    node_values = torch.rand(len(heads), generator=generator)
    edge_values = torch.rand(graph.valid.shape, generator=generator)
    nodes = {h: float(v) for h, v in zip(heads, node_values, strict=True)}
    return nodes, _edge_dict(graph, edge_values)


def _random(graph: CircuitGraph, options: MethodOptions) -> tuple[dict, dict, dict]:
    # a seed of the task's own, so one run's tasks do not share one ranking
    seed = (options.seed * 1_000_003 + zlib.crc32(graph.task.name.encode())) % 2**32
    nodes, edges = random_scores(graph, seed)
    return nodes, edges, {"random_seed": seed}


def _activation_patching(graph: CircuitGraph, options: MethodOptions) -> tuple[dict, dict, dict]:
    full = graph.metric()
    heads = [s for s in graph.senders if s != INPUT]
    nodes = {}
    for head in heads:
        kept = [h for h in heads if h != head]
        nodes[head] = abs(full - graph.metric(graph.mask_of_nodes(kept)))
    values = torch.zeros(graph.valid.shape)
    for s, r in graph.edge_index:
        keep = graph.full()
        keep[s, r] = False
        values[s, r] = abs(full - graph.metric(keep))
    return nodes, _edge_dict(graph, values), {}


def receiver_gradients(
    graph: CircuitGraph,
    input_embeddings: Float[Tensor, "batch pos d_model"] | None = None,
) -> Float[Tensor, "n_receivers batch pos d_model"]:
    """The gradient of the mean task metric at each receiver's input (a head's q, k and v
    inputs summed; the final residual stream for logits), on the clean prompts, with the
    embeddings replaced by `input_embeddings` when given. One forward and one backward pass.

    Raises:
        ValueError: when every gradient is zero (the metric does not depend on the model).
    """
    model = graph.task.model
    n_layers = model.cfg.n_layers
    seen: dict[str, Tensor] = {}

    def set_input(value: Tensor, hook: Any) -> Tensor:
        fresh = value.detach() if input_embeddings is None else input_embeddings.detach()
        fresh = fresh.clone().requires_grad_(True)
        seen["input"] = fresh
        return fresh

    def keep(name: str) -> Callable[[Tensor, Any], Tensor]:
        def hook(value: Tensor, hook: Any) -> Tensor:
            seen[name] = value
            return value

        return hook

    hooks: FwdHooks = [("blocks.0.hook_resid_pre", set_input)]
    names = []
    for layer in range(n_layers):
        for kind in ("q", "k", "v"):
            name = f"blocks.{layer}.hook_{kind}_input"
            hooks.append((name, keep(name)))
            names.append(name)
    final = f"blocks.{n_layers - 1}.hook_resid_post"
    hooks.append((final, keep(final)))
    with torch.enable_grad(), model.hooks(fwd_hooks=hooks):
        logits = model(graph.task.clean)
        value = graph.task.metric(logits, graph.task.clean).mean()
        if not value.requires_grad:
            raise ValueError(
                f"Task {graph.task.name!r}: the metric has no gradient with respect to the "
                f"model (its value is not computed from the logits): the metric does not depend "
                f"on the model, and attribution methods need a differentiable metric."
            )
        grads = torch.autograd.grad(
            value, [seen[n] for n in names] + [seen[final]], allow_unused=True
        )
    graph.passes.forward += 1
    graph.passes.backward += 1
    per_layer = []
    for layer in range(n_layers):
        parts = [g for g in grads[3 * layer : 3 * layer + 3] if g is not None]
        if parts:
            total = torch.stack(parts).sum(dim=0)
        else:
            total = torch.zeros_like(seen[names[3 * layer]])
        per_layer.append(total.permute(2, 0, 1, 3))
    last = grads[-1] if grads[-1] is not None else torch.zeros_like(seen[final])
    result = torch.cat([*per_layer, last[None]], dim=0)
    if not bool(result.abs().gt(0).any()):
        raise ValueError(
            f"Task {graph.task.name!r}: the metric's gradient is zero at every head's input and "
            f"at the logits: the metric does not depend on the model (attribution methods need "
            f"a metric computed from the logits, differentiably)."
        )
    return result


def _eap_values(
    graph: CircuitGraph, gradients: Float[Tensor, "n_receivers batch pos d_model"]
) -> Float[Tensor, "n_senders n_receivers"]:
    """Signed first-order change of the metric when each edge is ablated."""
    change = graph.ablated - graph.clean_outputs
    values = torch.einsum("sbpd,rbpd->sr", change, gradients)
    return values * graph.valid


def _attribution_patching(graph: CircuitGraph, options: MethodOptions) -> tuple[dict, None, dict]:
    values = _eap_values(graph, receiver_gradients(graph))
    # A head's output reaches every later receiver, so its own first-order effect is the
    # signed sum over its outgoing edges.
    summed = values.sum(dim=1).abs()
    nodes = {s: float(summed[i]) for i, s in enumerate(graph.senders) if s != INPUT}
    return nodes, None, {}


def _eap(graph: CircuitGraph, options: MethodOptions) -> tuple[dict, dict, dict]:
    values = _eap_values(graph, receiver_gradients(graph)).abs()
    return _nodes_from_edges(graph, values), _edge_dict(graph, values), {}


def _eap_ig(graph: CircuitGraph, options: MethodOptions) -> tuple[dict, dict, dict]:
    clean_input = graph.clean_outputs[0]
    ablated_input = graph.ablated[0]
    total = None
    for step in range(1, options.ig_steps + 1):
        alpha = step / options.ig_steps
        grads = receiver_gradients(graph, ablated_input + alpha * (clean_input - ablated_input))
        total = grads if total is None else total + grads
    assert total is not None
    values = _eap_values(graph, total / options.ig_steps).abs()
    return _nodes_from_edges(graph, values), _edge_dict(graph, values), {}


def _acdc(graph: CircuitGraph, options: MethodOptions) -> tuple[dict, dict, dict]:
    full = graph.metric()
    empty = graph.metric(graph.empty())
    threshold = options.acdc_threshold * abs(full - empty)
    keep = graph.full()
    values = torch.zeros(graph.valid.shape)
    distance = 0.0
    for r in reversed(range(len(graph.receivers))):
        receiver = graph.receivers[r]
        if receiver != LOGITS:
            s_index = graph.senders.index(receiver)
            if not bool(keep[s_index].any()):
                keep[:, r] = False  # nothing reads this head any more: its inputs cannot matter
                continue
        for s in reversed(range(len(graph.senders))):
            if not bool(keep[s, r]):
                continue
            keep[s, r] = False
            trial = abs(graph.metric(keep) - full)
            values[s, r] = trial - distance
            if trial - distance < threshold:
                distance = trial
            else:
                keep[s, r] = True
    kept = [name for (s, r), name in zip(graph.edge_index, graph.edges, strict=True) if keep[s, r]]
    extra = {"threshold": threshold, "kept_edges": kept}
    return _nodes_from_edges(graph, values), _edge_dict(graph, values), extra


def head_activations(
    task: CircuitTask, tokens: Int[Tensor, "n pos"]
) -> tuple[list[Float[Tensor, "n pos n_heads d_head"]], Float[Tensor, "n pos d_model"], Tensor]:
    """Every layer's `attn.hook_z`, the embeddings and the logits of `tokens` (one forward)."""
    model = task.model
    names = ["blocks.0.hook_resid_pre"] + [
        f"blocks.{layer}.attn.hook_z" for layer in range(model.cfg.n_layers)
    ]
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens, names_filter=names)
    z = [cache[f"blocks.{layer}.attn.hook_z"] for layer in range(model.cfg.n_layers)]
    return z, cache["blocks.0.hook_resid_pre"], torch.as_tensor(logits)


def total_variation(
    positive: Int[Tensor, " n_pos"], negative: Int[Tensor, " n_neg"], num_codes: int
) -> float:
    """Total variation distance between the code histograms of two samples (0: the same
    frequencies, 1: no code in common)."""
    p = torch.bincount(positive, minlength=num_codes).double() / max(positive.numel(), 1)
    q = torch.bincount(negative, minlength=num_codes).double() / max(negative.numel(), 1)
    return float(0.5 * (p - q).abs().sum())


def unique_to_positives(positive: Int[Tensor, " n_pos"], negative: Int[Tensor, " n_neg"]) -> float:
    """O'Neill & Bui's node score: how many distinct codes occur on positive prompts and never
    on negative ones."""
    return float(len(set(positive.tolist()) - set(negative.tolist())))


def _codes(graph: CircuitGraph, options: MethodOptions) -> tuple[dict, dict, dict]:
    task = graph.task
    model = task.model
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    negatives = task.negative_prompts
    z_pos, emb_pos, logits_pos = head_activations(task, task.clean)
    z_neg, emb_neg, logits_neg = head_activations(task, negatives)
    where_pos = (
        task.positions
        if task.positions is not None
        else torch.ones_like(task.clean, dtype=torch.bool)
    )
    if task.positions is not None and negatives.shape == task.clean.shape:
        where_neg = task.positions
    else:
        where_neg = torch.ones_like(negatives, dtype=torch.bool)
    n_rows = int(where_pos.sum() + where_neg.sum())
    num_codes = max(2, min(options.num_codes, n_rows))
    codes_pos: dict[str, Tensor] = {}
    codes_neg: dict[str, Tensor] = {}
    codebooks = []
    for layer in range(n_layers):
        cfg = CodebookConfig(
            d_in=n_heads * model.cfg.d_head,
            num_codes=num_codes,
            k=1,
            similarity="euclidean",
            n_groups=n_heads,
            hook_name=f"blocks.{layer}.attn.hook_z",
        )
        codebook = Codebook(cfg)
        rows = torch.cat([z_pos[layer][where_pos], z_neg[layer][where_neg]])
        initialise_codebook(
            codebook, rows, "kmeans", seed=options.seed + layer, kmeans_iters=options.kmeans_iters
        )
        codebooks.append(codebook)
        with torch.no_grad():  # rows flattened to [rows, d_in]: unambiguous with one head
            ids_pos = codebook.encode(z_pos[layer][where_pos].flatten(1))[..., 0]
            ids_neg = codebook.encode(z_neg[layer][where_neg].flatten(1))[..., 0]
        for head in range(n_heads):
            codes_pos[f"L{layer}H{head}"] = ids_pos[:, head]
            codes_neg[f"L{layer}H{head}"] = ids_neg[:, head]
    embed_cb = Codebook(
        CodebookConfig(d_in=model.cfg.d_model, num_codes=num_codes, similarity="euclidean")
    )
    initialise_codebook(
        embed_cb,
        torch.cat([emb_pos[where_pos], emb_neg[where_neg]]),
        "kmeans",
        seed=options.seed,
        kmeans_iters=options.kmeans_iters,
    )
    with torch.no_grad():
        codes_pos[INPUT] = embed_cb.encode(emb_pos[where_pos])[:, 0, 0]
        codes_neg[INPUT] = embed_cb.encode(emb_neg[where_neg])[:, 0, 0]
    codes_pos[LOGITS] = logits_pos[where_pos].argmax(dim=-1)
    codes_neg[LOGITS] = logits_neg[where_neg].argmax(dim=-1)
    sizes = {name: num_codes for name in codes_pos}
    sizes[LOGITS] = model.cfg.d_vocab
    heads = [s for s in graph.senders if s != INPUT]
    nodes = {h: total_variation(codes_pos[h], codes_neg[h], num_codes) for h in heads}
    unique = {h: unique_to_positives(codes_pos[h], codes_neg[h]) for h in heads}
    edges = {}
    for (s, r), name in zip(graph.edge_index, graph.edges, strict=True):
        sender, receiver = graph.senders[s], graph.receivers[r]
        width = sizes[receiver]
        joint_pos = codes_pos[sender] * width + codes_pos[receiver]
        joint_neg = codes_neg[sender] * width + codes_neg[receiver]
        edges[name] = total_variation(joint_pos, joint_neg, sizes[sender] * width)
    extra = {
        "unique_scores": unique,
        "num_codes": num_codes,
        "metric_clean": float(task.metric(logits_pos, task.clean).mean()),
        "codebooks": codebooks,
        "forward_passes": 2,
    }
    return nodes, edges, extra


def _metric_with_codebooks(task: CircuitTask, codebooks: list[Codebook]) -> float:
    """The task metric on the clean prompts with every layer's head outputs quantized by the
    codes method's codebooks (the codebooks *in* the model, which the scores do not need)."""

    def quantize(codebook: Codebook) -> Callable[[Tensor, Any], Tensor]:
        def hook(value: Tensor, hook: Any) -> Tensor:
            return codebook(value)

        return hook

    hooks: FwdHooks = [(cb.cfg.hook_name or "", quantize(cb)) for cb in codebooks]
    with torch.no_grad(), task.model.hooks(fwd_hooks=hooks):
        logits = task.model(task.clean)
    return float(task.metric(logits, task.clean).mean())


_METHODS: dict[str, Callable[[CircuitGraph, MethodOptions], tuple[dict, Any, dict]]] = {
    "codes": _codes,
    "activation_patching": _activation_patching,
    "attribution_patching": _attribution_patching,
    "eap": _eap,
    "eap_ig": _eap_ig,
    "acdc": _acdc,
    "random": _random,
}

__all__ = [
    "METHODS",
    "RANDOM_DRAWS",
    "CircuitScores",
    "MethodOptions",
    "edge_name",
    "random_scores",
    "receiver_gradients",
    "score_circuit",
    "total_variation",
    "unique_to_positives",
]
