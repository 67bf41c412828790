"""Logit effects and similar codes against hand computations."""

import pytest
import torch

from tl_codebook import Codebook, CodebookConfig, HookedCodebookTransformer
from tl_codebook.analysis.effects import logit_effects, similar_codes


@pytest.fixture
def model(make_tiny_cfg):
    return HookedCodebookTransformer(make_tiny_cfg())


def test_a_residual_code_acts_on_the_logits_through_w_u(model):
    cb = model.add_codebook(
        Codebook(CodebookConfig(d_in=16, num_codes=4, hook_name="blocks.1.hook_resid_post"))
    )
    with torch.no_grad():
        cb.codes.zero_()
        cb.codes[0, 2] = model.W_U[:, 7] - model.W_U[:, 3]  # raises token 7, lowers token 3
    expected = (cb.codes[0, 2] @ model.W_U).detach()
    top, bottom = logit_effects(model, "blocks.1.hook_resid_post", 2, top=11)
    assert [t for t, _ in top] == torch.argsort(expected, descending=True).tolist()
    assert [v for _, v in top] == pytest.approx(sorted(expected.tolist(), reverse=True), abs=1e-5)
    assert top[0][0] == 7 and bottom[0][0] == 3


def test_a_head_code_goes_through_that_heads_w_o(model):
    cb = model.add_codebook(
        Codebook(CodebookConfig(d_in=16, num_codes=5, n_groups=4, hook_name="blocks.0.attn.hook_z"))
    )
    expected = (cb.codes[2, 1] @ model.W_O[0, 2] @ model.W_U).detach()
    top, bottom = logit_effects(model, "blocks.0.attn.hook_z", 1, group=2, top=3)
    assert top == [
        (int(i), pytest.approx(float(expected[i]), abs=1e-5)) for i in expected.topk(3).indices
    ]
    low = (-expected).topk(3).indices
    assert bottom == [(int(i), pytest.approx(float(expected[i]), abs=1e-5)) for i in low]


def test_a_site_without_a_path_to_the_logits_is_refused(model):
    model.add_codebook(
        Codebook(CodebookConfig(d_in=16, num_codes=4, n_groups=4, hook_name="blocks.0.attn.hook_q"))
    )
    with pytest.raises(ValueError, match="cannot carry a code"):
        logit_effects(model, "blocks.0.attn.hook_q", 0)


def test_similar_codes_rank_by_cosine():
    cb = Codebook(CodebookConfig(d_in=2, num_codes=4))
    with torch.no_grad():
        cb.codes[0] = torch.tensor([[1.0, 0.0], [2.0, 0.1], [0.0, 1.0], [-1.0, 0.0]])
    found = similar_codes(cb, 0, top=3)
    assert [c for c, _ in found] == [1, 2, 3]
    assert found[0][1] == pytest.approx(2.0 / (4.01**0.5))
    assert found[1][1] == pytest.approx(0.0) and found[2][1] == pytest.approx(-1.0)
