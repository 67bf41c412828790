"""The SAELens adapter: a codebook as SAE architecture "codebook", spliced, evaluated and trained by SAELens."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

import math  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from sae_lens import SAE, HookedSAETransformer, TopKSAE, TopKSAEConfig  # noqa: E402
from sae_lens.config import SAETrainerConfig  # noqa: E402
from sae_lens.evals import get_eval_everything_config, run_evals  # noqa: E402
from sae_lens.registry import (  # noqa: E402
    SAE_CLASS_REGISTRY,
    SAE_TRAINING_CLASS_REGISTRY,
    get_sae_class,
    get_sae_training_class,
)
from sae_lens.saes.sae import SAEMetadata, TrainingSAE, TrainStepInput  # noqa: E402
from sae_lens.training.activation_scaler import ActivationScaler  # noqa: E402
from sae_lens.training.activations_store import ActivationsStore  # noqa: E402
from sae_lens.training.sae_trainer import SAETrainer  # noqa: E402
from transformer_lens import HookedTransformer, HookedTransformerConfig  # noqa: E402

from tl_codebook import Codebook, CodebookConfig, HookedCodebookTransformer  # noqa: E402
from tl_codebook.comparisons.saelens import (  # noqa: E402
    ARCHITECTURE,
    CodebookSAE,
    CodebookSAEConfig,
    CodebookTrainingSAE,
    CodebookTrainingSAEConfig,
    codebook_to_sae,
    register_codebook_architecture,
    sae_to_codebook,
)

SIMILARITIES = ("inner_product", "cosine", "euclidean")
RESID = "blocks.0.hook_resid_post"
HOOK_Z = "blocks.1.attn.hook_z"


def make_codebook(
    similarity: str = "inner_product",
    k: int = 2,
    n_groups: int = 1,
    d_in: int = 16,
    num_codes: int = 12,
    hook_name: str | None = RESID,
    seed: int = 0,
) -> Codebook:
    torch.manual_seed(seed)
    cfg = CodebookConfig(
        d_in=d_in,
        num_codes=num_codes,
        k=k,
        similarity=similarity,
        n_groups=n_groups,
        hook_name=hook_name,
        chunk_size=7,  # several chunks, one of them ragged
    )
    return Codebook(cfg)


def tiny_model_cfg() -> HookedTransformerConfig:
    return HookedTransformerConfig(
        n_layers=2,
        d_model=16,
        d_head=4,
        n_heads=4,
        d_mlp=32,
        n_ctx=8,
        d_vocab=11,
        act_fn="relu",
        seed=0,
        tokenizer_name=None,
    )


@pytest.fixture(scope="module")
def sae_model() -> HookedSAETransformer:
    return HookedSAETransformer(tiny_model_cfg()).eval()


@pytest.fixture(scope="module")
def plain_model(sae_model: HookedSAETransformer) -> HookedTransformer:
    """A HookedTransformer with exactly the weights of `sae_model`."""
    model = HookedTransformer(tiny_model_cfg()).eval()
    model.load_state_dict(sae_model.state_dict())
    return model


def tokens(n: int = 4, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 11, (n, 8), generator=torch.Generator().manual_seed(seed))


# -- registration ------------------------------------------------------------------------------


def test_architecture_registered_for_inference_and_training() -> None:
    assert get_sae_class(ARCHITECTURE) == (CodebookSAE, CodebookSAEConfig)
    assert get_sae_training_class(ARCHITECTURE) == (CodebookTrainingSAE, CodebookTrainingSAEConfig)
    assert (
        CodebookSAEConfig.architecture() == CodebookTrainingSAEConfig.architecture() == "codebook"
    )


def test_registration_is_idempotent() -> None:
    import tl_codebook.comparisons.saelens  # noqa: F401 - a second import is a no-op

    register_codebook_architecture()
    register_codebook_architecture()
    assert SAE_CLASS_REGISTRY[ARCHITECTURE] == (CodebookSAE, CodebookSAEConfig)


def test_registration_refuses_a_foreign_codebook_architecture(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(SAE_TRAINING_CLASS_REGISTRY, ARCHITECTURE, (TopKSAE, TopKSAEConfig))
    with pytest.raises(ValueError, match="already registered to .*TopKSAE"):
        register_codebook_architecture()


# -- encode / decode against the codebook --------------------------------------------------


@pytest.mark.parametrize("similarity", SIMILARITIES)
@pytest.mark.parametrize(("k", "n_groups"), [(1, 1), (2, 1), (2, 4), (3, 2)])
def test_reconstructions_are_the_codebooks(similarity: str, k: int, n_groups: int) -> None:
    cb = make_codebook(similarity, k=k, n_groups=n_groups)
    sae = cb.to_sae()
    x = torch.randn(3, 5, 16) * 2
    with torch.no_grad():
        expected = cb(x)
        got = sae.decode(sae.encode(x))
        forward = sae(x)
    if k & (k - 1) == 0:  # 1/k exact in binary: bit-for-bit the codebook's mean
        assert torch.equal(got, expected)
    else:  # 1/3 is rounded: equal up to the last bit
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    assert torch.equal(forward, got)


@pytest.mark.parametrize("similarity", SIMILARITIES)
@pytest.mark.parametrize(("k", "n_groups"), [(1, 1), (3, 1), (2, 4)])
def test_encode_has_k_activations_of_one_over_k_per_group_at_the_codebooks_ids(
    similarity: str, k: int, n_groups: int
) -> None:
    cb = make_codebook(similarity, k=k, n_groups=n_groups)
    sae = codebook_to_sae(cb)
    x = torch.randn(2, 6, 16)
    acts = sae.encode(x)
    assert acts.shape == (2, 6, n_groups * 12)
    grouped = acts.view(2, 6, n_groups, 12)
    assert torch.equal((grouped != 0).sum(-1), torch.full((2, 6, n_groups), k))
    assert (grouped[grouped != 0] == torch.tensor(1 / k)).all()
    expected = torch.zeros(2, 6, n_groups, 12).scatter_(-1, cb.encode(x), 1 / k)
    assert torch.equal(grouped, expected)


def test_hand_built_codebook_known_answer() -> None:
    """Two groups of 2-d codes; the best codes can be read off by eye."""
    cb = make_codebook(k=1, n_groups=2, d_in=4, num_codes=3)
    with torch.no_grad():
        cb.codes.copy_(
            torch.tensor(
                [
                    [[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]],
                    [[0.0, 2.0], [2.0, 0.0], [0.0, -2.0]],
                ]
            )
        )
    sae = cb.to_sae()
    x = torch.tensor([[0.1, 0.9, 0.0, -3.0]])  # group 0 -> code 1, group 1 -> code 2
    acts = sae.encode(x)
    assert acts.nonzero().tolist() == [[0, 1], [0, 3 + 2]]
    assert sae.decode(acts).tolist() == [[0.0, 1.0, 0.0, -2.0]]
    expected_w_dec = torch.tensor(
        [
            [1.0, 0.0, 0.0, 0.0],
            [0.0, 1.0, 0.0, 0.0],
            [-1.0, 0.0, 0.0, 0.0],
            [0.0, 0.0, 0.0, 2.0],
            [0.0, 0.0, 2.0, 0.0],
            [0.0, 0.0, 0.0, -2.0],
        ]
    )
    assert torch.equal(sae.W_dec, expected_w_dec)
    assert torch.equal(sae.W_enc, expected_w_dec.T / expected_w_dec.norm(dim=-1))  # tied, unit
    assert torch.equal(sae.b_dec, torch.zeros(4))


def test_euclidean_encoder_ranks_like_the_distance() -> None:
    cb = make_codebook("euclidean", k=1)
    sae = cb.to_sae()
    x = torch.randn(50, 16)
    ranking = (x @ sae.W_enc + sae.b_enc).argmax(-1)
    assert torch.equal(ranking, cb.encode(x)[:, 0, 0])


# -- conversion and config ----------------------------------------------------------------


def test_cfg_carries_hook_name_sizes_dtype_and_device() -> None:
    cb = make_codebook(n_groups=4, hook_name=HOOK_Z)
    cb.cfg.metadata["model_name"] = "tiny"
    sae = cb.to_sae()
    assert isinstance(sae, CodebookSAE)
    cfg = sae.cfg
    assert (cfg.d_in, cfg.d_sae, cfg.k, cfg.n_groups, cfg.num_codes) == (16, 48, 2, 4, 12)
    assert (cfg.dtype, cfg.device, cfg.similarity) == ("float32", "cpu", "inner_product")
    assert cfg.metadata.hook_name == HOOK_Z
    assert cfg.metadata.model_name == "tiny"
    assert cfg.reshape_activations == "hook_z"
    assert cfg.apply_b_dec_to_input is False
    assert cb.to_sae().codes.data_ptr() != cb.codes.data_ptr()  # a copy


@pytest.mark.parametrize("similarity", SIMILARITIES)
def test_round_trip_restores_the_codebook(similarity: str) -> None:
    cb = make_codebook(similarity, k=3, n_groups=2)
    cb.cfg.reconstruction_coef = 0.25
    back = sae_to_codebook(codebook_to_sae(cb))
    assert isinstance(back, Codebook)
    assert back.cfg == cb.cfg
    assert torch.equal(back.codes, cb.codes)
    assert back.codes.data_ptr() != cb.codes.data_ptr()


def test_double_precision_codebook_converts_in_double() -> None:
    cb = make_codebook()
    cb.codes.data = cb.codes.data.double()
    sae = cb.to_sae()
    assert sae.cfg.dtype == "float64" and sae.codes.dtype == torch.float64
    x = torch.randn(4, 16, dtype=torch.float64)
    assert torch.equal(sae.decode(sae.encode(x)), cb(x))
    assert sae_to_codebook(sae).codes.dtype == torch.float64


def test_save_and_load_with_saelens(tmp_path) -> None:
    cb = make_codebook("cosine", k=2, n_groups=4, hook_name=HOOK_Z)
    sae = cb.to_sae()
    sae.save_model(tmp_path / "inference")
    loaded = SAE.load_from_disk(tmp_path / "inference")
    assert isinstance(loaded, CodebookSAE)
    assert loaded.cfg.to_dict() == sae.cfg.to_dict()
    assert torch.equal(loaded.codes, sae.codes)
    assert sae_to_codebook(loaded).cfg == cb.cfg


def test_training_sae_saves_an_inference_sae(tmp_path) -> None:
    cfg = CodebookTrainingSAEConfig(d_in=8, d_sae=12, k=2, n_groups=2, similarity="euclidean")
    trained = CodebookTrainingSAE(cfg)
    trained.save_inference_model(tmp_path)
    loaded = SAE.load_from_disk(tmp_path)
    assert type(loaded) is CodebookSAE
    x = torch.randn(5, 8)
    assert torch.equal(loaded.encode(x), trained.encode(x))
    assert torch.equal(loaded.decode(loaded.encode(x)), trained.decode(trained.encode(x)))


def test_bad_configs_name_the_value_and_the_choices() -> None:
    with pytest.raises(ValueError, match="k=13 must be between 1 and num_codes .* 12"):
        CodebookSAEConfig(d_in=16, d_sae=12, k=13)
    with pytest.raises(ValueError, match="'cosin'.*inner_product, cosine, euclidean"):
        CodebookSAEConfig(d_in=16, d_sae=12, similarity="cosin")
    with pytest.raises(ValueError, match="d_sae=12 is not divisible by n_groups=5"):
        CodebookSAEConfig(d_in=20, d_sae=12, n_groups=5)
    with pytest.raises(ValueError, match="apply_b_dec_to_input must be False"):
        CodebookTrainingSAEConfig(d_in=16, d_sae=12, apply_b_dec_to_input=True)
    with pytest.raises(ValueError, match="covariance_whitening.*valid choices are none"):
        CodebookTrainingSAEConfig(d_in=16, d_sae=12, normalize_activations="covariance_whitening")


def test_wrong_inputs_are_refused() -> None:
    sae = make_codebook().to_sae()
    with pytest.raises(ValueError, match=r"expects inputs of shape \[\.\.\., d_in=16\].*\(2, 15\)"):
        sae.encode(torch.randn(2, 15))
    topk = TopKSAE(TopKSAEConfig(d_in=16, d_sae=12, k=2, metadata=SAEMetadata(hook_name=RESID)))
    with pytest.raises(TypeError, match="architecture 'codebook'.*TopKSAE of architecture 'topk'"):
        sae_to_codebook(topk)
    with pytest.raises(NotImplementedError, match="decoder norms are its outputs"):
        sae.fold_W_dec_norm()


def test_folding_an_activation_scale_keeps_the_snap() -> None:
    """Trained on x * s, run on x: the codes scale by 1/s and every pick stays the same."""
    for similarity in SIMILARITIES:
        cb = make_codebook(similarity, k=2)
        sae, scale = cb.to_sae(), 4.0
        x = torch.randn(10, 16)
        before = sae.decode(sae.encode(x * scale)) / scale
        sae.fold_activation_norm_scaling_factor(scale)
        torch.testing.assert_close(sae.decode(sae.encode(x)), before)


# -- gradients -----------------------------------------------------------------------------


def test_forward_passes_the_gradient_straight_through_to_the_input() -> None:
    cb = make_codebook(k=2, n_groups=4)
    cb.cfg.reconstruction_coef = 0.0
    sae = cb.to_sae()
    x = torch.randn(3, 16, requires_grad=True)
    weight = torch.randn(3, 16)
    (sae(x) * weight).sum().backward()
    assert torch.equal(x.grad, weight)
    x_cb = x.detach().clone().requires_grad_()
    (cb(x_cb) * weight).sum().backward()
    torch.testing.assert_close(sae.codes.grad, cb.codes.grad)


# -- HookedSAETransformer ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("hook_name", "n_groups", "similarity"),
    [(RESID, 1, "inner_product"), (RESID, 2, "euclidean"), (HOOK_Z, 4, "cosine")],
)
def test_run_with_saes_gives_our_logits(
    sae_model: HookedSAETransformer,
    plain_model: HookedTransformer,
    hook_name: str,
    n_groups: int,
    similarity: str,
) -> None:
    cb = make_codebook(similarity, k=2, n_groups=n_groups, hook_name=hook_name)
    sae = cb.to_sae()
    toks = tokens()
    with torch.no_grad():
        sae_logits = sae_model.run_with_saes(toks, saes=[sae])
        ours = HookedCodebookTransformer.from_model(plain_model)
        ours.add_codebook(cb)
        our_logits = ours(toks)
        base_logits = plain_model(toks)
    assert torch.equal(sae_logits, our_logits)
    assert not torch.allclose(our_logits, base_logits)  # the codebook does change the model
    assert not sae_model.acts_to_saes  # run_with_saes removed it again


def test_error_term_restores_the_base_model(
    sae_model: HookedSAETransformer, plain_model: HookedTransformer
) -> None:
    sae = make_codebook(k=2, n_groups=4, hook_name=HOOK_Z).to_sae()
    with torch.no_grad():
        logits = sae_model.run_with_saes(tokens(), saes=[sae], use_error_term=True)
    torch.testing.assert_close(logits, plain_model(tokens()))


def test_run_with_cache_sees_acts_and_similarity_scores(sae_model: HookedSAETransformer) -> None:
    cb = make_codebook("euclidean", k=2, n_groups=4, hook_name=HOOK_Z)
    sae = cb.to_sae()
    with torch.no_grad():
        _, cache = sae_model.run_with_cache_with_saes(tokens(2), saes=[sae])
    acts = cache[f"{HOOK_Z}.hook_sae_acts_post"]
    scores = cache[f"{HOOK_Z}.hook_sae_acts_pre"]
    z = cache[f"{HOOK_Z}.hook_sae_input"]  # flattened by SAELens' hook_z reshaping
    assert acts.shape == scores.shape == (2, 8, 48) and z.shape == (2, 8, 16)
    expected = torch.zeros(2, 8, 4, 12).scatter_(-1, cb.encode(z), 0.5)
    assert torch.equal(acts, expected.view(2, 8, 48))
    torch.testing.assert_close(scores.view(2, 8, 4, 12), cb.scores(z))


# -- run_evals -----------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:To copy construct from a tensor:UserWarning")  # SAELens' own
def test_run_evals_gives_finite_metrics_and_the_hand_computed_mse(
    plain_model: HookedTransformer,
) -> None:
    cb = make_codebook("cosine", k=2, n_groups=2, hook_name=RESID)
    sae = cb.to_sae()
    sae.cfg.metadata.prepend_bos = False
    data = tokens(4, seed=2)
    store = ActivationsStore.from_sae(
        plain_model,
        sae,
        Dataset.from_dict({"tokens": data.tolist()}),
        context_size=8,
        streaming=False,
        store_batch_size_prompts=2,
        n_batches_in_buffer=1,
        train_batch_size_tokens=16,
        total_tokens=4,
    )
    # Two batches of two prompts are exactly the data set, for both phases of run_evals.
    eval_cfg = get_eval_everything_config(
        batch_size_prompts=2, n_eval_reconstruction_batches=2, n_eval_sparsity_variance_batches=2
    )
    metrics, feature_metrics = run_evals(
        sae, store, plain_model, ActivationScaler(), eval_cfg, exclude_special_tokens=False
    )
    scalars = {f"{group}/{name}": v for group, vals in metrics.items() for name, v in vals.items()}
    assert all(math.isfinite(v) for v in scalars.values()), scalars
    assert scalars["sparsity/l0"] == 2 * 2  # k codes in each of n_groups groups
    assert scalars["sparsity/l1"] == pytest.approx(2.0)  # 1/k * k * n_groups
    _, cache = plain_model.run_with_cache(data, names_filter=[RESID])
    acts = cache[RESID]
    with torch.no_grad():
        hand_mse = (cb(acts) - acts).pow(2).sum(-1).mean().item()
    assert scalars["reconstruction_quality/mse"] == pytest.approx(hand_mse, rel=1e-5)
    assert sum(feature_metrics["feature_density"]) == pytest.approx(4.0)  # l0 again
    # Tied, unit-normalised encoder: every feature's encoder and decoder point the same way.
    assert feature_metrics["encoder_decoder_cosine_sim"] == pytest.approx([1.0] * 24)


# -- training --------------------------------------------------------------------------------


def random_step_input(x: torch.Tensor) -> TrainStepInput:
    return TrainStepInput(
        sae_in=x, coefficients={}, dead_neuron_mask=None, n_training_steps=0, is_logging_step=False
    )


@pytest.mark.parametrize("similarity", SIMILARITIES)
def test_one_training_step_reduces_the_loss(similarity: str) -> None:
    torch.manual_seed(0)
    cfg = CodebookTrainingSAEConfig(d_in=16, d_sae=32, k=2, n_groups=2, similarity=similarity)
    sae = CodebookTrainingSAE(cfg)
    assert isinstance(sae, TrainingSAE)
    x = torch.randn(64, 16)
    optimizer = torch.optim.SGD(sae.parameters(), lr=0.5)
    out = sae.training_forward_pass(random_step_input(x))
    assert set(out.losses) == {"mse_loss"}
    chosen = sae_to_codebook(sae)
    with torch.no_grad():
        hand = (chosen(x) - x).pow(2).sum(-1).mean()
    torch.testing.assert_close(out.loss.detach(), hand)
    out.loss.backward()
    # Gradient reaches exactly the codes chosen for some token, and no others.
    used = torch.zeros(2, 16, dtype=torch.bool)
    ids = chosen.encode(x)
    used[torch.arange(2).view(1, 2, 1).expand_as(ids), ids] = True
    assert torch.equal(sae.codes.grad.abs().sum(-1) > 0, used)
    optimizer.step()
    after = sae.training_forward_pass(random_step_input(x)).loss.item()
    assert after < out.loss.item()


def test_training_gradient_matches_the_codebooks_reconstruction_gradient() -> None:
    cfg = CodebookTrainingSAEConfig(d_in=16, d_sae=24, k=3, n_groups=2)
    sae = CodebookTrainingSAE(cfg)
    cb = sae_to_codebook(sae)
    cb.cfg.reconstruction_coef = 0.0
    x = torch.randn(20, 16)
    sae.training_forward_pass(random_step_input(x)).loss.backward()
    (cb(x) - x).pow(2).sum(-1).mean().backward()
    torch.testing.assert_close(sae.codes.grad, cb.codes.grad)


def test_saelens_trainer_trains_a_codebook() -> None:
    torch.manual_seed(0)
    centers = torch.randn(4, 8) * 3

    def batches():
        while True:
            yield centers[torch.randint(0, 4, (32,))] + 0.1 * torch.randn(32, 8)

    sae = CodebookTrainingSAE(CodebookTrainingSAEConfig(d_in=8, d_sae=8, k=1, init_std=0.1))
    probe = next(batches())
    before = sae.training_forward_pass(random_step_input(probe)).loss.item()
    trainer_cfg = SAETrainerConfig(
        total_training_samples=32 * 60, train_batch_size_samples=32, lr=0.05, lr_end=0.05
    )  # lr_end: SAETrainer asserts it is set (only LanguageModelSAERunnerConfig fills it in)
    trained = SAETrainer(trainer_cfg, sae, batches()).fit()
    after = trained.training_forward_pass(random_step_input(probe)).loss.item()
    assert after < 0.5 * before
    assert trained.cfg.metadata.l0 == pytest.approx(1.0)  # one code per token, recorded by SAELens
