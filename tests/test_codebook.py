"""Codebook module: contract shapes, groups on hook_z-shaped input, stats, config validation."""

import pytest
import torch

from tl_codebook import Codebook, CodebookConfig


def hand_built(k=2, similarity="inner_product") -> Codebook:
    cb = Codebook(CodebookConfig(d_in=2, num_codes=4, k=k, similarity=similarity))
    with torch.no_grad():
        cb.codes.copy_(torch.tensor([[[1.0, 0.0], [0.0, 2.0], [-1.0, 0.0], [3.0, 3.0]]]))
    return cb


def test_forward_encode_decode_known_answer():
    cb = hand_built(k=2)
    x = torch.tensor([[2.0, 0.9], [-3.0, 0.1]])
    ids = cb.encode(x)
    # second row: x.c/|c| = -3, 0.05, 3, -2.05 -> codes 2, 1
    assert ids.tolist() == [[[3, 0]], [[2, 1]]]
    y = cb(x)
    assert torch.allclose(y, torch.tensor([[2.0, 1.5], [-0.5, 1.0]]))
    assert torch.equal(y, cb.decode(ids).reshape(x.shape))


def test_hook_z_shaped_input_uses_one_codebook_per_head():
    cfg = CodebookConfig(d_in=4, num_codes=4, k=1, n_groups=2)
    cb = Codebook(cfg)
    base = torch.tensor([[1.0, 0.0], [0.0, 2.0], [-1.0, 0.0], [3.0, 3.0]])
    with torch.no_grad():
        cb.codes.copy_(torch.stack([base, -base]))
    z = torch.tensor([2.0, 0.9, 2.0, 0.9]).view(1, 1, 2, 2)  # [batch, pos, heads, d_head]
    ids = cb.encode(z)
    assert ids.shape == (1, 1, 2, 1)
    assert ids.flatten().tolist() == [3, 2]
    y = cb(z)
    assert y.shape == z.shape
    assert torch.allclose(y.flatten(), torch.tensor([3.0, 3.0, 1.0, 0.0]))
    # the flat [..., d_in] form gives the same answer
    assert torch.equal(cb(z.reshape(1, 1, 4)), y.reshape(1, 1, 4))
    assert torch.equal(cb.decode(ids), y.reshape(1, 1, 4))


def test_stats_count_hits_dead_codes_and_mse():
    cb = hand_built(k=1)
    x = torch.tensor([[2.0, 0.9], [2.1, 1.0], [-3.0, 0.1]])
    cb(x)
    assert cb.code_hits.tolist() == [[0, 0, 1, 2]]
    assert cb.dead_codes == 2 and cb.dead_fraction == 0.5
    expected = ((torch.tensor([[3.0, 3.0], [3.0, 3.0], [-1.0, 0.0]]) - x) ** 2).mean()
    assert cb.mean_squared_error == pytest.approx(float(expected))
    assert "code_hits" not in cb.state_dict()
    cb.reset_stats()
    assert cb.dead_codes == 4 and int(cb.tokens_seen) == 0


def test_init_from_activations_uses_real_inputs():
    cb = Codebook(CodebookConfig(d_in=6, num_codes=5, k=1, n_groups=2))
    x = torch.randn(40, 6)
    cb.init_from_activations(x, generator=torch.Generator().manual_seed(0))
    rows = x.view(40, 2, 3)
    for g in range(2):
        for code in cb.codes[g]:
            assert (rows[:, g] == code).all(-1).any()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(d_in=6, num_codes=4, n_groups=4), "not divisible by n_groups=4"),
        (dict(d_in=6, num_codes=4, k=0), "k"),
        (dict(d_in=6, num_codes=4, k=5), "k=5 must be between 1 and num_codes=4"),
        (dict(d_in=6, num_codes=0), "num_codes"),
        (dict(d_in=6, num_codes=4, similarity="cosin"), "Did you mean 'cosine'"),
        (dict(d_in=6, num_codes=4, commitment_coef=-1.0), "commitment_coef"),
    ],
)
def test_bad_config_raises_clear_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CodebookConfig(**kwargs)


def test_unknown_similarity_lists_choices():
    with pytest.raises(ValueError, match="inner_product, cosine, euclidean"):
        CodebookConfig(d_in=2, num_codes=2, similarity="dot")


def test_input_width_mismatch_names_shapes():
    cb = Codebook(CodebookConfig(d_in=8, num_codes=4, n_groups=2, hook_name="blocks.0.hook_z"))
    with pytest.raises(ValueError, match=r"\[\.\.\., 8\] or \[\.\.\., 2, 4\], got \(3, 5\)"):
        cb(torch.randn(3, 5))


def test_config_dict_round_trip_and_bad_keys():
    cfg = CodebookConfig(d_in=8, num_codes=16, k=2, n_groups=2, hook_name="x")
    assert CodebookConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="missing required key.*num_codes"):
        CodebookConfig.from_dict({"d_in": 8})
    with pytest.raises(
        ValueError, match="Unknown CodebookConfig key.*'num_code' \\(did you mean 'num_codes'\\?\\)"
    ):
        CodebookConfig.from_dict({"d_in": 8, "num_code": 3})


def test_decode_rejects_out_of_range_ids():
    cb = hand_built()
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        cb.decode(torch.tensor([[[4, 0]]]))


def test_a_non_finite_input_row_comes_out_nan_not_as_a_code():
    """NaN in, NaN out: a row with a NaN or inf is not hidden behind an arbitrary code."""
    cb = hand_built(k=2)
    x = torch.tensor([[2.0, 0.9], [float("nan"), 1.0], [float("inf"), 0.0], [-3.0, 0.1]])
    y = cb(x)
    assert torch.isnan(y[1:3]).all()
    assert torch.equal(y[[0, 3]], torch.tensor([[2.0, 1.5], [-0.5, 1.0]]))
    assert torch.isnan(torch.tensor(cb.mean_squared_error))


def test_the_same_seed_gives_the_same_codebook():
    cfg = CodebookConfig(d_in=8, num_codes=6, k=2, n_groups=2)
    torch.manual_seed(5)
    first = Codebook(cfg).codes.detach().clone()
    torch.manual_seed(5)
    again = Codebook(cfg).codes.detach().clone()
    torch.manual_seed(6)
    other = Codebook(cfg).codes.detach().clone()
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
