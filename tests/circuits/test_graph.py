"""The patched runs every circuit method shares, against runs patched by hand."""

from __future__ import annotations

import pytest
import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

from tl_codebook.comparisons.circuits.graph import CircuitGraph
from tl_codebook.comparisons.circuits.task import CircuitTask, model_edges


def next_token_log_prob(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    lp = logits[:, :-1].log_softmax(-1)
    return lp.gather(-1, tokens[:, 1:, None])[..., 0].mean(-1)


def small_task(normalization: str | None = "LN") -> CircuitTask:
    torch.manual_seed(0)
    cfg = HookedTransformerConfig(
        n_layers=2, d_model=16, d_head=4, n_heads=3, n_ctx=8, d_vocab=11, attn_only=True,
        act_fn=None, normalization_type=normalization, seed=0,
    )  # fmt: skip
    model = HookedTransformer(cfg)
    gen = torch.Generator().manual_seed(1)
    clean = torch.randint(0, 11, (4, 8), generator=gen)
    corrupted = torch.randint(0, 11, (4, 8), generator=gen)
    return CircuitTask("small", model, clean, corrupted, next_token_log_prob)


def test_edges_are_named_by_layer_order() -> None:
    task = small_task()
    edges = model_edges(task.model)
    # 3 layer-0 receivers x 1 sender, 3 layer-1 receivers x 4, logits x 7
    assert len(edges) == 3 + 12 + 7
    assert "L0H2->L1H0" in edges and "L1H0->L0H2" not in edges and "L1H1->L1H2" not in edges
    assert sorted(CircuitGraph.build(task).edges) == sorted(edges)


def test_full_circuit_is_the_model_and_empty_is_the_corrupted_run() -> None:
    task = small_task()
    graph = CircuitGraph.build(task)
    with torch.no_grad():
        clean_logits = task.model(task.clean)
        corrupted_logits = task.model(task.corrupted)
        torch.testing.assert_close(graph.run(graph.full()), clean_logits)
        # every receiver reads only corrupted senders: exactly the corrupted prompt's run
        torch.testing.assert_close(graph.run(graph.empty()), corrupted_logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("ablation", ["resample", "mean"])
def test_removing_a_head_equals_patching_its_output(ablation: str) -> None:
    task = small_task()
    graph = CircuitGraph.build(task, ablation)
    with torch.no_grad():
        _, cache = task.model.run_with_cache(task.corrupted)
    replacement = cache["blocks.0.attn.hook_result"][:, :, 1]
    if ablation == "mean":
        replacement = replacement.mean(dim=0, keepdim=True).expand_as(replacement)

    def patch(value: torch.Tensor, hook: object) -> torch.Tensor:
        value[:, :, 1] = replacement
        return value

    with torch.no_grad():
        expected = task.model.run_with_hooks(
            task.clean, fwd_hooks=[("blocks.0.attn.hook_result", patch)]
        )
        kept = ["L0H0", "L0H2", "L1H0", "L1H1", "L1H2"]
        torch.testing.assert_close(graph.run(graph.mask_of_nodes(kept)), expected)


def test_removing_one_edge_changes_only_that_receiver_input() -> None:
    task = small_task()
    graph = CircuitGraph.build(task)
    with torch.no_grad():
        _, clean = task.model.run_with_cache(task.clean)
        _, corrupted = task.model.run_with_cache(task.corrupted)
    change = (
        clean["blocks.0.attn.hook_result"][:, :, 2]
        - corrupted["blocks.0.attn.hook_result"][:, :, 2]
    )

    def patch(value: torch.Tensor, hook: object) -> torch.Tensor:
        value = value.clone()
        value[:, :, 1] = value[:, :, 1] - change
        return value

    hooks = [(f"blocks.1.hook_{kind}_input", patch) for kind in "qkv"]
    with torch.no_grad():
        expected = task.model.run_with_hooks(task.clean, fwd_hooks=hooks)
        got = graph.run(graph.full() & ~graph.mask_of_edges(["L0H2->L1H1"]))
    torch.testing.assert_close(got, expected)
    assert graph.mask_of_edges(["L0H2->L1H1"]).sum() == 1


def test_bad_ablation_is_refused_with_the_choices() -> None:
    with pytest.raises(ValueError, match="resample, mean"):
        CircuitGraph.build(small_task(), "zero")
