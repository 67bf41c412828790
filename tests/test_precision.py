"""Half precision (fp16, bf16) on CPU: the right codes, finite statistics of fixed dtypes."""

import pytest
import torch

from tl_codebook import Codebook, CodebookConfig, HookedCodebookTransformer

HALF = [torch.float16, torch.bfloat16]


def with_a_zero_code(similarity: str) -> Codebook:
    cb = Codebook(CodebookConfig(d_in=2, num_codes=4, k=2, similarity=similarity))
    with torch.no_grad():
        cb.codes.copy_(torch.tensor([[[1.0, 0.0], [0.0, 0.0], [-1.0, 0.0], [3.0, 3.0]]]))
    return cb


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("similarity", ["inner_product", "cosine", "euclidean"])
def test_a_zero_code_does_not_win_in_half_precision(dtype, similarity):
    """x.c/|c| for c = 0 is taken as 0 in every dtype (not 0/0 = NaN, which top-k ranks first)."""
    cb = with_a_zero_code(similarity).to(dtype)
    x = torch.tensor([[3.0, 2.5], [-3.0, 0.1]], dtype=dtype)
    expected = with_a_zero_code(similarity).encode(x.float())
    assert 1 not in expected[0].flatten().tolist()  # the zero code is not among row 0's best two
    assert torch.equal(cb.encode(x), expected)
    assert torch.equal(cb(x), cb.decode(expected).reshape(x.shape))
    assert cb.scores(x).isfinite().all()


@pytest.mark.parametrize("dtype", HALF)
def test_stats_keep_their_dtypes_and_stay_finite_after_half(tiny_cfg, tokens, dtype):
    model = HookedCodebookTransformer(tiny_cfg)
    torch.manual_seed(0)
    cb = model.add_codebook(
        Codebook(CodebookConfig(d_in=16, num_codes=8, k=1, hook_name="blocks.0.hook_resid_post"))
    )
    model.to(dtype)
    assert cb.codes.dtype == dtype
    assert cb.squared_error_sum.dtype == torch.float64
    assert cb.code_hits.dtype == torch.long and cb.tokens_seen.dtype == torch.long
    with torch.no_grad():
        cb.codes.mul_(200.0)  # squared errors of ~1e5 per token: beyond fp16's 65504
        model(tokens)
    assert cb.squared_error_sum.dtype == torch.float64
    assert int(cb.code_hits.sum()) == tokens.numel()
    x = model.run_with_cache(tokens)[1]["blocks.0.hook_resid_post.hook_codebook_in"]
    cb.reset_stats()
    out = cb(x)
    exact = (out.double() - x.double()).pow(2).mean().item()
    assert cb.mean_squared_error == pytest.approx(exact, rel=1e-3)
    assert exact > 65504.0 / 16


def test_ids_are_checked_only_where_a_hook_can_have_changed_them(monkeypatch, tiny_cfg, tokens):
    """check_ids costs host syncs on GPU: skip it when nothing sits on hook_codes."""
    model = HookedCodebookTransformer(tiny_cfg)
    cb = model.add_codebook(
        Codebook(CodebookConfig(d_in=16, num_codes=8, k=1, hook_name="blocks.0.hook_resid_post"))
    )
    calls = []
    original = Codebook.check_ids
    monkeypatch.setattr(
        Codebook, "check_ids", lambda self, ids: calls.append(1) or original(self, ids)
    )
    model(tokens)
    assert calls == []
    with pytest.raises(ValueError, match=r"Code ids must lie in \[0, 8\); got values from 8 to 8"):
        model.run_with_hooks(
            tokens,
            fwd_hooks=[
                ("blocks.0.hook_resid_post.hook_codes", lambda ids, hook: torch.full_like(ids, 8))
            ],
        )
    assert calls == [1] and cb.enabled
