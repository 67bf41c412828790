import pytest
import torch

from tl_codebook.training.dead_codes import replace_dead_codes, reset_optimizer_rows


def recent_inputs_by_group(num_inputs: int, num_groups: int, dim: int) -> torch.Tensor:
    """Input i of group g is (100 * g + i, 1, 1, ...): its group and index can be read off."""
    inputs = torch.ones(num_inputs, num_groups, dim)
    inputs[:, :, 0] = 100 * torch.arange(num_groups) + torch.arange(num_inputs)[:, None]
    return inputs


def test_replaces_exactly_the_dead_codes_with_inputs_of_their_group():
    codes = -torch.rand(2, 6, 4)
    before = codes.clone()
    hits = torch.tensor([[3, 0, 1, 0, 0, 7], [0, 2, 2, 2, 2, 2]])
    inputs = recent_inputs_by_group(10, 2, 4)
    counts = replace_dead_codes(
        codes, hits, inputs, noise_scale=0.0, generator=torch.Generator().manual_seed(0)
    )
    assert counts.tolist() == [3, 1]
    dead = hits == 0
    assert torch.equal(codes[~dead], before[~dead])
    for group, code in dead.nonzero().tolist():
        revived = codes[group, code]
        assert torch.equal(revived[1:], torch.ones(3))
        assert revived[0] in (100 * group + torch.arange(10.0))
    # Without noise, distinct dead codes of a group got distinct inputs.
    assert len({codes[0, c, 0].item() for c in (1, 3, 4)}) == 3


def test_noise_is_relative_to_the_input_norm():
    dim = 512
    codes = torch.zeros(1, 4, dim)
    inputs = (
        torch.randn(8, 1, dim, generator=torch.Generator().manual_seed(0))
        * torch.tensor([1.0, 1000.0]).repeat(4)[:, None, None]
    )
    replace_dead_codes(
        codes,
        torch.zeros(1, 4, dtype=torch.long),
        inputs,
        noise_scale=0.1,
        generator=torch.Generator().manual_seed(1),
    )
    nearest = torch.cdist(codes[0], inputs[:, 0]).argmin(-1)
    source = inputs[nearest, 0]
    relative = (codes[0] - source).norm(dim=-1) / source.norm(dim=-1)
    torch.testing.assert_close(relative, torch.full((4,), 0.1), atol=0.01, rtol=0)


def test_more_dead_codes_than_inputs_revives_them_all():
    codes = torch.zeros(1, 5, 3)
    inputs = recent_inputs_by_group(2, 1, 3)
    counts = replace_dead_codes(codes, torch.zeros(1, 5, dtype=torch.long), inputs, 0.0)
    assert counts.tolist() == [5]
    assert set(codes[0, :, 0].tolist()) == {0.0, 1.0}
    assert torch.equal(codes[0, :, 1:], torch.ones(5, 2))


def test_parameter_is_updated_in_place_without_autograd_history():
    codes = torch.nn.Parameter(torch.zeros(1, 3, 2))
    replace_dead_codes(codes, torch.tensor([[0, 1, 0]]), torch.ones(4, 1, 2), 0.0)
    assert codes.is_leaf and codes.grad_fn is None
    assert codes[0, :, 0].tolist() == [1.0, 0.0, 1.0]


def test_same_generator_seed_same_result():
    data_generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(20, 3, 8, generator=data_generator)
    hits = torch.randint(0, 2, (3, 16), generator=data_generator)
    results = []
    for _ in range(2):
        codes = torch.zeros(3, 16, 8)
        replace_dead_codes(codes, hits, inputs, 0.05, torch.Generator().manual_seed(3))
        results.append(codes)
    assert torch.equal(*results)


def test_nothing_dead_changes_nothing():
    codes = torch.randn(2, 4, 3)
    before = codes.clone()
    counts = replace_dead_codes(codes, torch.ones(2, 4, dtype=torch.long), torch.randn(0, 2, 3))
    assert counts.tolist() == [0, 0]
    assert torch.equal(codes, before)


def test_dead_codes_without_inputs_raise():
    with pytest.raises(ValueError, match="recent_inputs is empty"):
        replace_dead_codes(
            torch.zeros(1, 2, 3), torch.zeros(1, 2, dtype=torch.long), torch.zeros(0, 1, 3)
        )


def test_negative_noise_scale_raises():
    with pytest.raises(ValueError, match="noise_scale must be >= 0, got -1.0"):
        replace_dead_codes(
            torch.zeros(1, 2, 3),
            torch.zeros(1, 2, dtype=torch.long),
            torch.zeros(4, 1, 3),
            noise_scale=-1.0,
        )


def adam_after_one_step() -> tuple[torch.optim.Adam, torch.nn.Parameter]:
    codes = torch.nn.Parameter(torch.zeros(2, 3, 4))
    optimizer = torch.optim.Adam([codes], lr=0.1)
    codes.grad = torch.ones_like(codes)
    optimizer.step()
    return optimizer, codes


def test_reset_optimizer_rows_clears_adam_moments_of_masked_codes_only():
    optimizer, codes = adam_after_one_step()
    mask = torch.tensor([[True, False, False], [False, False, True]])
    assert reset_optimizer_rows(optimizer, codes, mask) == 2
    state = optimizer.state[codes]
    for name in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(state[name][mask], torch.zeros(2, 4))
        assert (state[name][~mask] > 0).all()
    assert float(state["step"]) == 1.0


def test_reset_optimizer_rows_before_first_step_is_a_no_op():
    codes = torch.nn.Parameter(torch.zeros(2, 3, 4))
    optimizer = torch.optim.Adam([codes])
    assert reset_optimizer_rows(optimizer, codes, torch.ones(2, 3, dtype=torch.bool)) == 0


def test_reset_optimizer_rows_rejects_foreign_param_and_bad_mask():
    optimizer, codes = adam_after_one_step()
    with pytest.raises(ValueError, match="not among the optimizer's parameters"):
        reset_optimizer_rows(
            optimizer, torch.nn.Parameter(torch.zeros(2, 3, 4)), torch.ones(2, 3, dtype=torch.bool)
        )
    with pytest.raises(ValueError, match=r"mask of shape \(3,\) must match"):
        reset_optimizer_rows(optimizer, codes, torch.ones(3, dtype=torch.bool))
