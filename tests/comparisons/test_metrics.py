"""One metrics function for every method, checked on planted data with known answers."""

import math

import pytest
import torch
from transformer_lens import HookedTransformer

from tl_codebook import Codebook, CodebookConfig
from tl_codebook.analysis.concepts import code_concept_precision_recall
from tl_codebook.comparisons.methods import IdentityMethod, ZeroMethod, as_method
from tl_codebook.comparisons.metrics import (
    EvalConfig,
    evaluate_method,
    latent_concept_precision_recall,
)
from tl_codebook.comparisons.store import ActivationStore, StoreError, model_fingerprint
from tl_codebook.fsm import FSM, FSMConfig
from tl_codebook.fsm.dataset import determined_states

RESID = "blocks.0.hook_resid_post"
QUIET = EvalConfig(progress=False, steering_prompts=8)


def planted_directions(n: int, d: int, scale: float = 3.0) -> torch.Tensor:
    """`n` orthogonal directions of norm `scale` in `d` dimensions."""
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(0)))
    return q[:n] * scale


def planted_codebook(directions: torch.Tensor, k: int) -> Codebook:
    cb = Codebook(CodebookConfig(d_in=directions.shape[1], num_codes=directions.shape[0], k=k))
    with torch.no_grad():
        cb.codes.copy_(directions[None])
    return cb


def test_a_codebook_at_the_planted_directions_reconstructs_exactly(tmp_path) -> None:
    """Each token is the mean of k=2 of C=8 orthogonal directions: FVE 1, L0 2, nothing dead."""
    directions = planted_directions(8, 16)
    g = torch.Generator().manual_seed(1)
    chosen = torch.stack([torch.randperm(8, generator=g)[:2] for _ in range(6 * 5)]).view(6, 5, 2)
    acts = directions[chosen].mean(-2)
    tokens = torch.zeros(6, 5, dtype=torch.long)
    store = ActivationStore.write(tmp_path / "s", {"h": acts}, tokens, "planted", "p")
    row = evaluate_method(planted_codebook(directions, k=2), store, "h", config=QUIET).row
    assert row["fve"] == pytest.approx(1.0, abs=1e-6)
    assert row["mse"] == pytest.approx(0.0, abs=1e-10)
    assert row["l0"] == 2 and row["dead_fraction"] == 0.0
    assert math.isnan(row["ce_loss_recovered"]) and math.isnan(row["steering_success"])


def test_the_zero_method_explains_no_variance(tmp_path) -> None:
    x = torch.randn(4, 6, 8, generator=torch.Generator().manual_seed(2))
    acts = torch.cat([x, -x])  # mean exactly zero: SSE of a zero reconstruction = total variance
    store = ActivationStore.write(tmp_path / "s", {"h": acts}, torch.ones(8, 6).long(), "m", "f")
    row = evaluate_method(ZeroMethod(8, d_sae=3), store, "h", config=QUIET).row
    assert row["fve"] == pytest.approx(0.0, abs=1e-6)
    assert row["l0"] == 0 and row["dead_fraction"] == 1.0


def test_planted_states_give_precision_and_recall_one(tmp_path) -> None:
    """Tokens written by a TokFSM; where a state is known the activation is that state's direction,
    elsewhere one more direction: the planted codebook finds a precise latent for every state."""
    fsm = FSM.generate(FSMConfig(n_states=4, n_edges=2, base=2, seed=0))
    walks = fsm.sample_trajectories(12, 4, torch.Generator().manual_seed(0))
    tokens = fsm.trajectory_to_tokens(walks)
    labels = determined_states(fsm, tokens)
    directions = planted_directions(fsm.n_states + 1, 8)
    acts = directions[torch.where(labels >= 0, labels, fsm.n_states)]
    store = ActivationStore.write(tmp_path / "s", {"h": acts}, tokens, "m", "f")
    cb = planted_codebook(directions, k=1)
    result = evaluate_method(cb, store, "h", fsm=fsm, config=QUIET)
    assert result.row["states_with_precise_latent"] == 1.0
    assert result.row["mean_best_precision"] == 1.0 and result.row["mean_best_recall"] == 1.0
    assert [s["latent"] for s in result.details["per_state"]] == [0, 1, 2, 3]
    # the generic latent scores equal the codebook's own code scores
    flat_acts, flat_labels = acts.view(-1, 8), labels.view(-1)
    generic = latent_concept_precision_recall(
        as_method(cb).encode(flat_acts) > 0, flat_labels, fsm.n_states
    )
    codes = code_concept_precision_recall(cb.encode(flat_acts), flat_labels, 5, fsm.n_states)
    assert torch.equal(generic.precision, codes.precision)
    assert torch.equal(generic.recall, codes.recall)


@pytest.fixture
def model_store(tiny_cfg, tmp_path):
    model = HookedTransformer(tiny_cfg).eval()
    tokens = torch.randint(0, 11, (6, 9), generator=torch.Generator().manual_seed(0))
    store = ActivationStore.build(model, tokens, [RESID], tmp_path / "s", progress=False)
    return model, store


def test_the_identity_method_recovers_all_the_loss(model_store) -> None:
    model, store = model_store
    row = evaluate_method(IdentityMethod(16), store, RESID, model=model, config=QUIET).row
    assert row["ce_loss_recovered"] == pytest.approx(1.0, abs=1e-6)
    assert row["kl"] == pytest.approx(0.0, abs=1e-7)
    assert row["fve"] == pytest.approx(1.0, abs=1e-6)
    assert row["ce_zero_ablation"] != pytest.approx(row["ce_clean"])  # a real denominator
    zero = evaluate_method(ZeroMethod(16), store, RESID, model=model, config=QUIET).row
    assert zero["ce_loss_recovered"] == pytest.approx(0.0, abs=1e-6)


def test_excluded_tokens_are_neither_scored_nor_spliced(model_store) -> None:
    model, store = model_store
    tokens = store.tokens()
    with pytest.raises(StoreError, match="no tokens to evaluate"):
        evaluate_method(
            ZeroMethod(16), store, RESID, exclude_token_ids=list(range(11)), config=QUIET
        )
    kept = evaluate_method(
        ZeroMethod(16), store, RESID, exclude_token_ids=[int(tokens[0, 0])], config=QUIET
    ).row
    assert kept["eval_tokens"] == int((tokens != tokens[0, 0]).sum())
    # splicing the zero method everywhere but the excluded tokens is the zero-ablation baseline
    row = evaluate_method(
        ZeroMethod(16),
        store,
        RESID,
        model=model,
        exclude_token_ids=[int(tokens[0, 0])],
        config=QUIET,
    ).row
    assert row["ce_spliced"] == pytest.approx(row["ce_zero_ablation"])


def test_width_hook_and_model_mismatches_are_refused(model_store, make_tiny_cfg) -> None:
    model, store = model_store
    with pytest.raises(ValueError, match="d_in=12, but the store's activations at .* width 16"):
        evaluate_method(IdentityMethod(12), store, RESID, config=QUIET)
    with pytest.raises(StoreError, match="no activations at 'blocks.1.hook_resid_post'"):
        evaluate_method(IdentityMethod(16), store, "blocks.1.hook_resid_post", config=QUIET)
    other = HookedTransformer(make_tiny_cfg(seed=5))
    assert model_fingerprint(other) != model_fingerprint(model)
    with pytest.raises(StoreError, match="built for model"):
        evaluate_method(IdentityMethod(16), store, RESID, model=other, config=QUIET)
    with pytest.raises(TypeError, match="needs encode"):
        as_method(object())
