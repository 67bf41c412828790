"""State codes and steering on hand-made models whose answers can be worked out on paper."""

import pytest
import torch

from tl_codebook import Codebook, CodebookConfig, HookedCodebookTransformer
from tl_codebook.analysis.concepts import code_concept_precision_recall
from tl_codebook.fsm import FSM, FSMConfig
from tl_codebook.fsm.steering import (
    CONDITIONS,
    context_labels,
    evaluate_interventions,
    generate_next_state,
    random_codes_like,
    state_code_scores,
    steering_codes,
    summarize_state_codes,
)

LAST_RESID = "blocks.1.hook_resid_post"


def ring_fsm() -> FSM:
    """4 states in base 2 (2 digits each: 00 01 10 11); state s goes to s+1 and s+2 (mod 4)."""
    transitions = torch.tensor([[1, 2], [2, 3], [3, 0], [0, 1]])
    return FSM(FSMConfig(n_states=4, n_edges=2, base=2), transitions)


def test_context_labels_mark_states_and_states_plus_digits_so_far():
    fsm = ring_fsm()
    # BOS, state 1 (0 1), state 2 (1 0), state 3 (1 1), then a partial state (0)
    tokens = torch.tensor([[2, 0, 1, 1, 0, 1, 1, 0]])
    assert context_labels(fsm, tokens, 0).tolist() == [[-1, -1, 1, -1, 2, -1, 3, -1]]
    # phase 1: the state just completed, then the next state's first digit (label = s * 2 + digit)
    assert context_labels(fsm, tokens, 1).tolist() == [
        [-1, -1, -1, 1 * 2 + 1, -1, 2 * 2 + 1, -1, 3 * 2 + 0]
    ]
    with pytest.raises(ValueError, match="phase"):
        context_labels(fsm, tokens, 2)


def embedding_codebook_model(make_tiny_cfg) -> HookedCodebookTransformer:
    """A model whose codebook at hook_embed holds the 3 token embeddings: code id = token id."""
    model = HookedCodebookTransformer(make_tiny_cfg(d_vocab=3))
    cb = Codebook(CodebookConfig(d_in=16, num_codes=3, hook_name="hook_embed"))
    with torch.no_grad():
        cb.codes.copy_(model.W_E.detach()[None])
    model.add_codebook(cb)
    return model


def test_state_code_scores_known_answer_on_token_codes(make_tiny_cfg):
    fsm = ring_fsm()
    model = embedding_codebook_model(make_tiny_cfg)
    walks = fsm.sample_trajectories(64, 8, torch.Generator().manual_seed(0))
    tokens = fsm.trajectory_to_tokens(walks)
    phase0, phase1 = state_code_scores(model, fsm, tokens)
    scores = phase0["hook_embed"]
    # at a state's last digit the code is that digit: recall 1, precision = share of the states
    # ending in that digit (states 0, 2 end in 0; 1, 3 end in 1)
    best = scores.best_code_per_label()
    assert best.code.tolist() == [0, 1, 0, 1]
    assert torch.allclose(best.recall, torch.ones(4))
    assert (best.precision < 0.9).all()
    summary = summarize_state_codes(phase0, fsm.n_states, threshold=0.9)
    assert summary["states_with_precise_code"] == 0.0
    assert [r["code"] for r in summary["best_per_state"]] == [0, 1, 0, 1]
    # one digit into the next state the code is that digit, for every (state, digit) label
    best1 = phase1["hook_embed"].best_code_per_label()
    seen = phase1["hook_embed"].label_counts > 0
    assert (best1.code[seen] == torch.arange(8)[seen] % 2).all()


def digit_writer(make_tiny_cfg, fsm: FSM) -> HookedCodebookTransformer:
    """A model whose last residual stream goes through a codebook whose code i makes the model
    write digit i: forcing code i at a position makes the next token i, whatever came before."""
    model = HookedCodebookTransformer(make_tiny_cfg(d_vocab=fsm.vocab_size))
    with torch.no_grad():
        model.W_U.zero_()
        model.b_U.zero_()
        for token in range(fsm.vocab_size):
            model.W_U[token, token] = 1.0
    cb = Codebook(CodebookConfig(d_in=16, num_codes=fsm.base, hook_name=LAST_RESID))
    with torch.no_grad():
        cb.codes.copy_(10 * torch.eye(16)[: fsm.base][None])
    model.add_codebook(cb)
    return model


def oracle_scores(fsm: FSM) -> list[dict]:
    """Concept scores saying: the code for state s is the first digit of s's first successor t,
    and the code for "s, then t's first digit" is t's second digit."""
    first = fsm.transitions[:, 0]
    digits = torch.stack([torch.tensor(fsm.state_to_tokens(int(t))) for t in first])
    states = torch.arange(fsm.n_states)
    phase0 = code_concept_precision_recall(
        digits[:, 0].view(-1, 1, 1), states, fsm.base, fsm.n_states
    )
    phase1 = code_concept_precision_recall(
        digits[:, 1].view(-1, 1, 1),
        states * fsm.base + digits[:, 0],
        fsm.base,
        fsm.n_states * fsm.base,
    )
    return [{LAST_RESID: phase0}, {LAST_RESID: phase1}]


def oracle_spec_for(fsm: FSM):
    """The `spec_for` of steering with `oracle_scores`: each (phase, label)'s best code."""
    scores = oracle_scores(fsm)

    def spec_for(phase: int, label: int):
        return steering_codes(scores[phase], label)

    return spec_for


ORACLE_PROMPT_WALKS = [[0, 1], [2, 3], [3, 0]]
"""Three ring-FSM walks the oracle tests prompt with."""


def test_forcing_state_codes_writes_the_known_next_state(make_tiny_cfg):
    fsm = ring_fsm()
    model = digit_writer(make_tiny_cfg, fsm)
    spec_for = oracle_spec_for(fsm)
    prompts = fsm.trajectory_to_tokens(torch.tensor(ORACLE_PROMPT_WALKS))

    for target in range(fsm.n_states):
        states = generate_next_state(model, fsm, prompts, target, spec_for, temperature=0.0)
        assert states.tolist() == [int(fsm.transitions[target, 0])] * 3


def test_evaluate_interventions_beats_the_baselines_on_the_digit_writer(make_tiny_cfg):
    fsm = ring_fsm()
    model = digit_writer(make_tiny_cfg, fsm)
    results = evaluate_interventions(
        model, fsm, oracle_scores(fsm), n_prompts=40, temperature=0.0, progress=False
    )
    assert set(CONDITIONS) <= set(results)
    assert results["steer"]["success"] == 1.0
    assert results["steer_best_site"]["success"] == 1.0  # there is only one codebook
    for condition in CONDITIONS:
        for key in ("success", "follows_source"):
            assert 0.0 <= results[condition][key] <= 1.0
    assert results["random_code"]["success"] < 1.0
    assert 0.0 <= results["chance_overlap"] <= 1.0


def test_steering_codes_choose_slots_by_precision():
    # two sites: site a's code 3 means label 0 perfectly; site b's code 1 fires for both labels
    ids_a = torch.tensor([3, 3, 5, 5]).view(-1, 1, 1)
    ids_b = torch.tensor([1, 1, 1, 1]).view(-1, 1, 1)
    labels = torch.tensor([0, 0, 1, 1])
    scores = {
        "a": code_concept_precision_recall(ids_a, labels, 8, 3),
        "b": code_concept_precision_recall(ids_b, labels, 8, 3),
    }
    assert steering_codes(scores, 0) == {"a": {0: [3]}, "b": {0: [1]}}
    assert steering_codes(scores, 0, min_precision=0.9) == {"a": {0: [3]}}
    assert steering_codes(scores, 0, best_site_only=True) == {"a": {0: [3]}}
    assert steering_codes(scores, 2) == {}  # label 2 never occurs
    with pytest.raises(ValueError, match="out of range"):
        steering_codes(scores, 3)


def test_random_codes_like_keeps_slots_and_avoids_the_steering_code(make_tiny_cfg):
    fsm = ring_fsm()
    model = digit_writer(make_tiny_cfg, fsm)
    generator = torch.Generator().manual_seed(0)
    for _ in range(5):
        spec = random_codes_like({LAST_RESID: {0: [1]}}, model, generator)
        assert spec == {LAST_RESID: {0: [0]}}  # base 2: the only other code
