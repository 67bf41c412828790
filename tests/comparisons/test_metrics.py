"""One metrics function for every method, checked on planted data with known answers."""

import math

import pytest
import torch
from transformer_lens import HookedTransformer

from tl_codebook import Codebook, CodebookConfig
from tl_codebook.analysis.concepts import (
    active_concept_precision_recall,
    code_concept_precision_recall,
)
from tl_codebook.comparisons.methods import IdentityMethod, ZeroMethod, as_method
from tl_codebook.comparisons.metrics import EvalConfig, evaluate_method
from tl_codebook.comparisons.store import ActivationStore, StoreError, model_fingerprint
from tl_codebook.fsm import FSM, FSMConfig
from tl_codebook.fsm.dataset import determined_states
from tl_codebook.fsm.task import TokFSMTask
from tl_codebook.tasks import Task

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
    assert row["explained_variance"] == pytest.approx(1.0, abs=1e-6)
    assert row["mse"] == pytest.approx(0.0, abs=1e-10)
    assert row["l0"] == 2 and row["dead_fraction"] == 0.0
    assert math.isnan(row["ce_loss_score"]) and math.isnan(row["steering_success"])


def test_the_zero_method_explains_no_variance(tmp_path) -> None:
    x = torch.randn(4, 6, 8, generator=torch.Generator().manual_seed(2))
    acts = torch.cat([x, -x])  # mean exactly zero: SSE of a zero reconstruction = total variance
    store = ActivationStore.write(tmp_path / "s", {"h": acts}, torch.ones(8, 6).long(), "m", "f")
    row = evaluate_method(ZeroMethod(8, d_sae=3), store, "h", config=QUIET).row
    assert row["explained_variance"] == pytest.approx(0.0, abs=1e-6)
    assert row["mse"] == pytest.approx(acts.pow(2).sum(-1).mean().item(), rel=1e-6)
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
    task = TokFSMTask(fsm, seq_len=tokens.shape[1])
    result = evaluate_method(cb, store, "h", task=task, config=QUIET)
    assert result.row["concepts_with_precise_latent"] == 1.0
    assert result.row["states_with_precise_latent"] == 1.0  # the documented alias
    assert result.row["mean_best_precision"] == 1.0 and result.row["mean_best_recall"] == 1.0
    assert [s["latent"] for s in result.details["per_concept"]] == [0, 1, 2, 3]
    assert result.row["eval_tokens"] == int((tokens != fsm.bos_token).sum())  # BOS: the task's
    # the generic latent scores equal the codebook's own code scores
    flat_acts, flat_labels = acts.view(-1, 8), labels.view(-1)
    generic = active_concept_precision_recall(
        as_method(cb).encode(flat_acts) != 0, flat_labels, fsm.n_states
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
    assert row["ce_loss_score"] == pytest.approx(1.0, abs=1e-6)
    assert row["kl_div_with_sae"] == pytest.approx(0.0, abs=1e-7)
    assert row["kl_div_score"] == pytest.approx(1.0, abs=1e-6)
    assert row["explained_variance"] == pytest.approx(1.0, abs=1e-6)
    assert row["ce_loss_with_ablation"] != pytest.approx(row["ce_loss_without_sae"])  # real span
    zero = evaluate_method(ZeroMethod(16), store, RESID, model=model, config=QUIET).row
    assert zero["ce_loss_score"] == pytest.approx(0.0, abs=1e-6)
    assert zero["kl_div_with_sae"] == pytest.approx(zero["kl_div_with_ablation"])


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
    # the zero method is spliced only at kept tokens, SAELens' ablation zeroes every token: with
    # nothing excluded the two coincide
    row = evaluate_method(ZeroMethod(16), store, RESID, model=model, config=QUIET).row
    assert row["ce_loss_with_sae"] == pytest.approx(row["ce_loss_with_ablation"])
    assert row["ce_loss_score"] == pytest.approx(0.0, abs=1e-6)


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


# -- the same numbers as SAELens' run_evals ------------------------------------------------------


BOS = 10


def saelens_run_evals(sae, model, tokens: torch.Tensor, exclude: list[int]) -> dict[str, float]:
    """SAELens' own evaluation of `sae` on exactly `tokens` (two batches covering them once)."""
    from datasets import Dataset
    from sae_lens.evals import get_eval_everything_config, run_evals
    from sae_lens.training.activation_scaler import ActivationScaler
    from sae_lens.training.activations_store import ActivationsStore

    sae.cfg.metadata.prepend_bos = False
    half = tokens.shape[0] // 2
    store = ActivationsStore.from_sae(
        model,
        sae,
        Dataset.from_dict({"tokens": tokens.tolist()}),
        context_size=tokens.shape[1],
        streaming=False,
        store_batch_size_prompts=half,
        n_batches_in_buffer=1,
        train_batch_size_tokens=16,
        total_tokens=tokens.numel(),
    )
    config = get_eval_everything_config(
        batch_size_prompts=half, n_eval_reconstruction_batches=2, n_eval_sparsity_variance_batches=2
    )
    metrics, _ = run_evals(
        sae, store, model, ActivationScaler(), config, exclude_special_tokens=exclude
    )
    return {name: value for group in metrics.values() for name, value in group.items()}


def topk_sae(d_in: int, d_sae: int, k: int):
    from sae_lens import TopKSAE, TopKSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    torch.manual_seed(3)
    sae = TopKSAE(TopKSAEConfig(d_in=d_in, d_sae=d_sae, k=k, metadata=SAEMetadata(hook_name=RESID)))
    with torch.no_grad():  # a non-zero decoder bias, so FVE and CE differ from a plain projection
        sae.b_dec.normal_(0, 0.3)
    return sae


@pytest.mark.filterwarnings("ignore:To copy construct from a tensor:UserWarning")  # SAELens' own
@pytest.mark.parametrize("which", ["topk", "codebook"])
@pytest.mark.parametrize("exclude", [[], [BOS]])
def test_explained_variance_ce_loss_score_and_kl_are_saelens_own(
    tiny_cfg, tmp_path, which, exclude
) -> None:
    """`evaluate_method` and `sae_lens.evals.run_evals` on the same SAE and tokens agree: with
    excluded tokens SAELens zero-ablates every position and masks excluded ones in every mean."""
    model = HookedTransformer(tiny_cfg).eval()
    g = torch.Generator().manual_seed(4)
    tokens = torch.randint(0, 10, (4, 9), generator=g)
    tokens[:, 0] = BOS
    tokens[1, 5] = BOS  # an excluded token inside a sequence too
    if which == "topk":
        sae = topk_sae(16, 32, k=4)
    else:
        torch.manual_seed(5)
        sae = Codebook(CodebookConfig(d_in=16, num_codes=24, k=2, hook_name=RESID)).to_sae()
    theirs = saelens_run_evals(sae, model, tokens, exclude)
    store = ActivationStore.build(model, tokens, [RESID], tmp_path / "s", progress=False)
    ours = evaluate_method(sae, store, RESID, model=model, exclude_token_ids=exclude, config=QUIET)
    row = ours.row
    for name in (
        "explained_variance",
        "mse",
        "l0",
        "ce_loss_score",
        "ce_loss_with_sae",
        "ce_loss_without_sae",
        "ce_loss_with_ablation",
        "kl_div_with_sae",
        "kl_div_with_ablation",
        "kl_div_score",
    ):
        assert row[name] == pytest.approx(theirs[name], rel=1e-5, abs=1e-6), name
    # the documented aliases carry the same numbers
    assert row["fve"] == row["explained_variance"]
    assert row["ce_loss_recovered"] == row["ce_loss_score"]
    assert row["kl"] == row["kl_div_with_sae"]


# -- steering: a known answer ----------------------------------------------------------------------


def test_steering_writes_the_forced_digit_and_the_task_judges_it(make_tiny_cfg) -> None:
    """A model that writes the digit its last residual holds, and a codebook there whose code i
    is digit i: forcing code i at every generated position writes "i i". On the ring FSM (s goes
    to s+1 and s+2) that state is a successor of targets 1 ("11" = 3), 2 ("11") and 3 ("00" = 0);
    target 0 has no latent here, so steering succeeds exactly on the prompts aimed at 1, 2, 3."""
    from tl_codebook.comparisons.metrics import steering_metrics

    fsm = FSM(
        FSMConfig(n_states=4, n_edges=2, base=2), torch.tensor([[1, 2], [2, 3], [3, 0], [0, 1]])
    )
    task = TokFSMTask(fsm, seq_len=7, steering_prompt_states=2)
    model = HookedTransformer(make_tiny_cfg(d_vocab=fsm.vocab_size)).eval()
    with torch.no_grad():
        model.W_U.zero_()
        model.b_U.zero_()
        for token in range(fsm.vocab_size):
            model.W_U[token, token] = 1.0
    last = "blocks.1.hook_resid_post"
    cb = Codebook(CodebookConfig(d_in=16, num_codes=2, hook_name=last))
    with torch.no_grad():
        cb.codes.copy_(10 * torch.eye(16)[:2][None])
    config = EvalConfig(
        steering_prompts=24,
        steering_temperature=0.0,
        steering_positions="generation",
        progress=False,
    )
    best_latent = torch.tensor([-1, 1, 1, 0])
    scores = steering_metrics(
        as_method(cb), model, task, last, best_latent, torch.ones(2), [fsm.bos_token], config
    )
    targets = task.steering_trials(24, seed=config.seed).targets
    assert (targets == 0).any() and (targets != 0).any()
    assert scores["steering_success"] == (targets != 0).float().mean().item()


class TokenIsConcept(Task):
    """A task with no steering: the concept at each position is the token id itself."""

    name = "token-is-concept"

    def __init__(self, vocab: int):
        self.vocab = vocab

    @property
    def concept_names(self) -> list[str]:
        return [f"token {t}" for t in range(self.vocab)]

    def concept_labels(self, tokens):
        return tokens.clone()

    def to_dict(self):
        return {"name": self.name, "vocab": self.vocab}

    @classmethod
    def from_dict(cls, data):
        return cls(data["vocab"])


def test_any_task_plugs_in_and_is_reopened_from_the_store(tmp_path) -> None:
    """A task the comparison has never heard of: a codebook whose code c is token c's activation
    has a precise latent for every token; the store's metadata names the task for `run`."""
    from tl_codebook.comparisons.compare import ComparisonConfig, run, task_of
    from tl_codebook.comparisons.methods import TrainingConfig
    from tl_codebook.tasks import TASKS, register_task

    directions = planted_directions(5, 8)
    tokens = torch.randint(0, 5, (6, 7), generator=torch.Generator().manual_seed(0))
    register_task(TokenIsConcept.name, TokenIsConcept)
    try:
        task = TokenIsConcept(5)
        store = ActivationStore.write(
            tmp_path / "s",
            {"h": directions[tokens]},
            tokens,
            "m",
            "f",
            metadata={"task": task.to_dict()},
        )
        assert isinstance(task_of(store), TokenIsConcept)
        config = ComparisonConfig(training=TrainingConfig("h", d_sae=5), evaluation=QUIET)
        [row] = run(store, [planted_codebook(directions, k=1)], config).rows
    finally:
        del TASKS[TokenIsConcept.name]
    assert row["concepts_with_precise_latent"] == 1.0
    assert row["mean_best_precision"] == row["mean_best_recall"] == 1.0
    assert math.isnan(row["steering_success"])  # the task has no steering measure
