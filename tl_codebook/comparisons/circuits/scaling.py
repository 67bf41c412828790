"""How each method's cost grows with the number of heads: the same methods on attention-only
models of growing width, timed in one run so the figures are ratios on one machine.

The models are randomly initialised (a method's cost does not depend on what the weights
learned) and the metric is the next-token log-probability of random prompts, so no training
is needed; what is measured is wall time and passes, not accuracy.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens import HookedTransformer, HookedTransformerConfig

from tl_codebook.comparisons.circuits.compare import check_methods
from tl_codebook.comparisons.circuits.graph import CircuitGraph
from tl_codebook.comparisons.circuits.methods import METHODS, MethodOptions, score_circuit
from tl_codebook.comparisons.circuits.task import CircuitTask


def next_token_log_prob(
    logits: Float[Tensor, "n pos d_vocab"], tokens: Int[Tensor, "n pos"]
) -> Float[Tensor, " n"]:
    """Mean log-probability of each next token: a metric any language model has."""
    log_probs = logits[:, :-1].log_softmax(dim=-1)
    return log_probs.gather(-1, tokens[:, 1:, None])[..., 0].mean(dim=-1)


def width_task(
    n_heads: int, n_layers: int = 2, n_prompts: int = 10, seq_len: int = 16, seed: int = 0
) -> CircuitTask:
    """A random attention-only model with `n_heads` heads per layer and random prompt pairs."""
    torch.manual_seed(seed)
    cfg = HookedTransformerConfig(
        n_layers=n_layers,
        d_model=64,
        d_head=16,
        n_heads=n_heads,
        n_ctx=seq_len,
        d_vocab=50,
        attn_only=True,
        normalization_type="LN",
        seed=seed,
    )
    model = HookedTransformer(cfg)
    generator = torch.Generator().manual_seed(seed)
    clean = torch.randint(0, 50, (n_prompts, seq_len), generator=generator)
    corrupted = torch.randint(0, 50, (n_prompts, seq_len), generator=generator)
    return CircuitTask(f"width{n_heads}", model, clean, corrupted, next_token_log_prob)


def time_against_heads(
    head_counts: Sequence[int] = (2, 4, 8, 16),
    methods: Iterable[str] = METHODS,
    options: MethodOptions | None = None,
    n_prompts: int = 10,
) -> list[dict[str, Any]]:
    """Seconds and passes of each method on models with each number of heads per layer (two
    layers): one row per width and method."""
    chosen = check_methods(methods)
    rows = []
    for n_heads in head_counts:
        task = width_task(n_heads, n_prompts=n_prompts)
        graph = CircuitGraph.build(task)
        for method in chosen:
            scores = score_circuit(task, method, graph, options)
            rows.append(
                {
                    "method": method,
                    "heads": n_heads * task.model.cfg.n_layers,
                    "edges": len(graph.edges),
                    "seconds": scores.seconds,
                    "forward_passes": scores.passes.forward,
                    "backward_passes": scores.passes.backward,
                }
            )
    return rows
