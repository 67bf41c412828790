"""The Jensen-Shannon intervention measure: the divergence itself, the exact next-state
distribution (against a brute-force product over whole sequences) and its known answers on a
model whose forced codes decide its output."""

import math
from contextlib import ExitStack

import pytest
import torch
import torch.nn.functional as F
from jaxtyping import TypeCheckError

from tl_codebook import Codebook, CodebookConfig, HookedCodebookTransformer
from tl_codebook.fsm import FSM, FSMConfig
from tl_codebook.fsm.divergence import (
    intervention_divergence,
    jensen_shannon,
    next_state_distribution,
    target_distribution,
)
from tl_codebook.fsm.steering import evaluate_interventions

from .test_steering import (
    LAST_RESID,
    ORACLE_PROMPT_WALKS,
    digit_writer,
    oracle_scores,
    oracle_spec_for,
    ring_fsm,
)


def test_jensen_shannon_known_values():
    assert jensen_shannon(torch.tensor([0.3, 0.7]), torch.tensor([0.3, 0.7])).item() == 0.0
    assert jensen_shannon(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])).item() == 1.0
    # p = (1, 0), q = (1/2, 1/2): m = (3/4, 1/4); JS = (log2(4/3) + (log2(2/3) + 1) / 2) / 2
    expected = (math.log2(4 / 3) + (math.log2(2 / 3) + 1) / 2) / 2
    js = jensen_shannon(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.5, 0.5]]))
    assert js.shape == (1,)
    assert js.item() == pytest.approx(expected, abs=1e-6)
    # refused (by the shape annotation when run-time checks are on, as here, else by a ValueError)
    with pytest.raises((ValueError, TypeCheckError)):
        jensen_shannon(torch.ones(2) / 2, torch.ones(3) / 3)


def test_target_distribution_is_uniform_over_out_edges_with_no_mass_on_no_state():
    fsm = ring_fsm()  # state 0 -> 1, 2; state 3 -> 0, 1
    probs = target_distribution(fsm, torch.tensor([0, 3]))
    assert probs.tolist() == [[0.0, 0.5, 0.5, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0, 0.0]]


def brute_force_distribution(model, fsm, prompts, target, spec_for):
    """P(next state t) by running prompt + digits(t) once per state with every phase's codes
    forced at once (causal attention: a later position's codes cannot change earlier logits)."""
    last, d = prompts.shape[1] - 1, fsm.digits_per_state
    out = torch.zeros(prompts.shape[0], fsm.n_states)
    for t in range(fsm.n_states):
        digits = fsm.state_to_tokens(t)
        tokens = torch.cat([prompts, torch.tensor(digits).expand(prompts.shape[0], d)], dim=1)
        with ExitStack() as stack:
            for i in range(d):
                value = 0
                for digit in digits[:i]:
                    value = value * fsm.base + digit
                spec = spec_for(i, target * fsm.base**i + value)
                if spec:
                    stack.enter_context(model.force_codes(spec, positions=[last + i]))
            log_probs = F.log_softmax(model(tokens).float(), dim=-1)
        for i in range(d):
            out[:, t] += log_probs[:, last + i, digits[i]]
    return out.exp()


def random_codebook_model(make_tiny_cfg, fsm: FSM) -> HookedCodebookTransformer:
    torch.manual_seed(0)
    model = HookedCodebookTransformer(make_tiny_cfg(d_vocab=fsm.vocab_size))
    model.add_codebook(Codebook(CodebookConfig(d_in=16, num_codes=6, hook_name=LAST_RESID)))
    model.eval()
    return model


@pytest.mark.parametrize("forced", [False, True])
def test_next_state_distribution_equals_the_product_over_whole_sequences(make_tiny_cfg, forced):
    fsm = FSM.generate(FSMConfig(n_states=7, n_edges=2, base=3, seed=1))  # 2 digits, 9 strings
    model = random_codebook_model(make_tiny_cfg, fsm)
    prompts = fsm.trajectory_to_tokens(torch.tensor([[0, 3], [5, 1], [2, 6]]))

    def spec_for(phase: int, label: int):  # a different code for every (phase, label)
        return {LAST_RESID: {0: [(3 * phase + label) % 6]}} if forced else None

    exact = next_state_distribution(model, fsm, prompts, target=4, spec_for=spec_for)
    assert exact.shape == (3, fsm.n_states + 1)
    assert torch.allclose(exact.sum(dim=-1), torch.ones(3), atol=1e-5)
    expected = brute_force_distribution(model, fsm, prompts, 4, spec_for)
    assert torch.allclose(exact[:, :-1], expected, atol=1e-5)
    # 7 of the 9 digit strings are states: the other two, and BOS, carry real mass here
    assert (exact[:, -1] > 1e-3).all()


def sharp_digit_writer(make_tiny_cfg, fsm: FSM) -> HookedCodebookTransformer:
    """`digit_writer` with 10x its unembedding: the forced code's digit gets > 0.999."""
    model = digit_writer(make_tiny_cfg, fsm)
    with torch.no_grad():
        model.W_U.mul_(10)
    return model


def test_forcing_the_oracle_codes_concentrates_on_the_first_successor(make_tiny_cfg):
    fsm = ring_fsm()
    model = sharp_digit_writer(make_tiny_cfg, fsm)
    spec_for = oracle_spec_for(fsm)
    prompts = fsm.trajectory_to_tokens(torch.tensor(ORACLE_PROMPT_WALKS))

    for target in range(fsm.n_states):
        probs = next_state_distribution(model, fsm, prompts, target, spec_for)
        first = int(fsm.transitions[target, 0])
        assert (probs[:, first] > 0.99).all()
    # all mass on one of the target's 2 successors: JS to uniform over both is a known number
    targets = torch.tensor([2, 0, 1])
    js = intervention_divergence(model, fsm, prompts, targets, spec_for)
    expected = (math.log2(4 / 3) + (math.log2(2 / 3) + 1) / 2) / 2
    assert torch.allclose(js, torch.full((3,), expected), atol=1e-2)


def test_evaluate_interventions_reports_js_per_condition(make_tiny_cfg):
    fsm = ring_fsm()
    model = sharp_digit_writer(make_tiny_cfg, fsm)
    results = evaluate_interventions(
        model, fsm, oracle_scores(fsm), n_prompts=24, temperature=0.0, progress=False
    )
    expected = (math.log2(4 / 3) + (math.log2(2 / 3) + 1) / 2) / 2
    assert results["steer"]["js_divergence"] == pytest.approx(expected, abs=1e-2)
    assert results["random_code"]["js_divergence"] > results["steer"]["js_divergence"] + 0.1
    without = evaluate_interventions(
        model, fsm, oracle_scores(fsm), n_prompts=8, progress=False, js_divergence=False
    )
    assert "js_divergence" not in without["steer"]
