"""Codebooks inside TransformerLens models: hook names, exact bypass, errors, generate, wrapping."""

import pytest
import torch
from sae_lens import HookedSAETransformer
from transformer_lens import HookedTransformer

from tl_codebook import Codebook, CodebookConfig, HookedCodebookTransformer, UnknownHookError
from tl_codebook.hooks import attach_codebook, detach_codebook

SITES = {
    "blocks.0.attn.hook_z": dict(d_in=16, n_groups=4, k=2),
    "blocks.1.hook_mlp_out": dict(d_in=16, k=1),
    "blocks.0.hook_resid_post": dict(d_in=16, k=3, similarity="euclidean"),
}


def with_codebooks(model, num_codes=24):
    torch.manual_seed(0)
    for name, kw in SITES.items():
        model.add_codebook(Codebook(CodebookConfig(num_codes=num_codes, hook_name=name, **kw)))
    return model


def greedy_loop(model, tokens, n):
    for _ in range(n):
        tokens = torch.cat([tokens, model(tokens)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return tokens


def test_codebook_hook_points_appear_in_cache_with_contract_shapes(tiny_cfg, tokens):
    model = with_codebooks(HookedCodebookTransformer(tiny_cfg))
    assert set(model.codebooks) == set(SITES)
    _, cache = model.run_with_cache(tokens)
    b, p = tokens.shape
    assert cache["blocks.0.attn.hook_z.hook_codes"].shape == (b, p, 4, 2)
    assert cache["blocks.0.attn.hook_z.hook_codebook_in"].shape == (b, p, 4, 4)
    assert cache["blocks.1.hook_mlp_out.hook_codes"].shape == (b, p, 1, 1)
    assert cache["blocks.0.hook_resid_post.hook_codes"].shape == (b, p, 1, 3)
    assert cache["blocks.0.hook_resid_post.hook_codes"].dtype == torch.long
    # the site's own name now carries the codebook's output, which is what flows on
    out = cache["blocks.1.hook_mlp_out.hook_codebook_out"]
    assert torch.equal(cache["blocks.1.hook_mlp_out"], out)
    cb = model.codebooks["blocks.1.hook_mlp_out"]
    assert torch.equal(out, cb.decode(cache["blocks.1.hook_mlp_out.hook_codes"]))
    # and the codebook's input is what the MLP produced
    ids = cb.encode(cache["blocks.1.hook_mlp_out.hook_codebook_in"])
    assert torch.equal(ids, cache["blocks.1.hook_mlp_out.hook_codes"])


def test_run_with_hooks_sees_and_can_edit_codes(tiny_cfg, tokens):
    model = with_codebooks(HookedCodebookTransformer(tiny_cfg))
    seen = {}

    def set_all_to_seven(ids, hook):
        seen[hook.name] = ids.clone()
        return torch.full_like(ids, 7)

    _, cache = model.run_with_cache(tokens)  # noqa: F841
    logits = model.run_with_hooks(
        tokens, fwd_hooks=[("blocks.1.hook_mlp_out.hook_codes", set_all_to_seven)]
    )
    assert "blocks.1.hook_mlp_out.hook_codes" in seen
    mlp_out = model.codebooks["blocks.1.hook_mlp_out"].codes[0, 7]
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n == "blocks.1.hook_mlp_out")
    assert not torch.allclose(cache["blocks.1.hook_mlp_out"][0, 0], mlp_out)
    with model.hooks(fwd_hooks=[("blocks.1.hook_mlp_out.hook_codes", set_all_to_seven)]):
        _, cache = model.run_with_cache(tokens, names_filter="blocks.1.hook_mlp_out")
        assert torch.equal(model(tokens), logits)
    assert torch.allclose(
        cache["blocks.1.hook_mlp_out"], mlp_out.expand_as(cache["blocks.1.hook_mlp_out"])
    )


def test_disabled_and_removed_codebooks_restore_base_logits_exactly(tiny_cfg, tokens):
    model = HookedCodebookTransformer(tiny_cfg)
    base = model(tokens)
    with_codebooks(model)
    assert not torch.allclose(model(tokens), base)
    with model.codebooks_disabled():
        assert torch.equal(model(tokens), base)
    with model.codebooks_disabled(["blocks.1.hook_mlp_out"]):
        assert model.codebooks["blocks.1.hook_mlp_out"].enabled is False
        assert model.codebooks["blocks.0.attn.hook_z"].enabled is True
    assert all(cb.enabled for cb in model.codebooks.values())
    removed = model.remove_codebooks()
    assert set(removed) == set(SITES) and model.codebooks == {}
    assert torch.equal(model(tokens), base)
    assert "blocks.1.hook_mlp_out.hook_codes" not in model.hook_dict
    assert type(model.hook_dict["blocks.1.hook_mlp_out"]).__name__ == "HookPoint"


def test_unknown_hook_name_lists_closest_names(tiny_cfg):
    model = HookedCodebookTransformer(tiny_cfg)
    cb = Codebook(CodebookConfig(d_in=16, num_codes=8, hook_name="blocks.1.hook_mlp_outt"))
    with pytest.raises(
        UnknownHookError,
        match="'blocks.1.hook_mlp_outt'.*Closest valid names: blocks.1.hook_mlp_out",
    ):
        model.add_codebook(cb)
    with pytest.raises(UnknownHookError, match="no codebook named 'blocks.0.hook_resid_post'"):
        model.remove_codebooks("blocks.0.hook_resid_post")


def test_width_mismatch_is_caught_when_attaching(tiny_cfg):
    model = HookedCodebookTransformer(tiny_cfg)
    cb = Codebook(CodebookConfig(d_in=8, num_codes=8, hook_name="blocks.0.hook_resid_pre"))
    with pytest.raises(ValueError, match=r"shape \(1, 1, 16\).*\[\.\.\., 8\]"):
        model.add_codebook(cb)
    assert model.codebooks == {}
    twice = Codebook(CodebookConfig(d_in=16, num_codes=8, hook_name="blocks.0.hook_resid_pre"))
    model.add_codebook(twice)
    with pytest.raises(ValueError, match="already sits"):
        model.add_codebook(
            Codebook(CodebookConfig(d_in=16, num_codes=8, hook_name="blocks.0.hook_resid_pre"))
        )


@pytest.mark.parametrize("positional", ["standard", "rotary"])
def test_generate_with_codebooks_matches_step_by_step_greedy(make_tiny_cfg, positional, tokens):
    cfg = make_tiny_cfg(positional_embedding_type=positional)
    model = with_codebooks(HookedCodebookTransformer(cfg))
    expected = greedy_loop(model, tokens[:, :4], 6)
    windows = []
    with model.hooks(
        fwd_hooks=[
            ("blocks.1.hook_mlp_out.hook_codes", lambda ids, hook: windows.append(ids.shape[1]))
        ]
    ):
        got = model.generate(
            tokens[:, :4], max_new_tokens=6, do_sample=False, stop_at_eos=False, verbose=False
        )
    assert torch.equal(got, expected)
    assert windows == [4, 1, 1, 1, 1, 1]  # the KV cache is used, also for absolute positions


def test_transformer_lens_generate_bug_we_work_around(make_tiny_cfg, tokens):
    """Documents TL 3.9: KV-cached generate, no tokenizer, absolute positions -> wrong tokens."""
    model = HookedTransformer(make_tiny_cfg(positional_embedding_type="standard"))
    expected = greedy_loop(model, tokens[:, :4], 6)
    cached = model.generate(
        tokens[:, :4], max_new_tokens=6, do_sample=False, stop_at_eos=False, verbose=False
    )
    uncached = model.generate(
        tokens[:, :4],
        max_new_tokens=6,
        do_sample=False,
        stop_at_eos=False,
        verbose=False,
        use_past_kv_cache=False,
    )
    assert torch.equal(uncached, expected)
    assert not torch.equal(
        cached, expected
    )  # if this starts failing, TL fixed it: drop our workaround


def test_from_model_shares_weights_but_not_structure(tiny_cfg, tokens):
    base = HookedTransformer(tiny_cfg)
    before = base(tokens)
    wrapped = HookedCodebookTransformer.from_model(base)
    assert wrapped.W_E.data_ptr() == base.W_E.data_ptr()
    assert torch.equal(wrapped(tokens), before)
    with_codebooks(wrapped)
    assert torch.equal(base(tokens), before)  # the original has no codebooks
    assert "blocks.1.hook_mlp_out.hook_codes" not in base.hook_dict
    with torch.no_grad():
        wrapped.W_E.add_(1.0)
    assert torch.equal(base.W_E, wrapped.W_E)


def test_attach_to_hooked_sae_transformer(tiny_cfg, tokens):
    model = HookedSAETransformer(tiny_cfg)
    base = model(tokens)
    cb = Codebook(CodebookConfig(d_in=16, num_codes=8, hook_name="blocks.0.hook_resid_post"))
    attach_codebook(model, cb)
    _, cache = model.run_with_cache(tokens)
    assert cache["blocks.0.hook_resid_post.hook_codes"].shape == (*tokens.shape, 1, 1)
    detach_codebook(model, "blocks.0.hook_resid_post")
    assert torch.equal(model(tokens), base)


def test_joint_gradients_reach_codes_and_model(tiny_cfg, tokens):
    model = with_codebooks(HookedCodebookTransformer(tiny_cfg))
    loss = model(tokens, return_type="loss")
    loss.backward()
    assert model.W_E.grad is not None and model.W_E.grad.abs().sum() > 0
    for cb in model.codebooks.values():
        assert cb.codes.grad is not None and cb.codes.grad.abs().sum() > 0


def test_attaching_a_codebook_keeps_the_users_other_hooks(tiny_cfg, tokens):
    """The width probe removes only its own hook: a hook elsewhere and an active force survive."""
    model = HookedCodebookTransformer(tiny_cfg)
    torch.manual_seed(0)
    first = model.add_codebook(
        Codebook(CodebookConfig(d_in=16, num_codes=8, hook_name="blocks.1.hook_resid_post"))
    )
    calls = []
    model.add_hook("blocks.0.hook_mlp_out", lambda act, hook: calls.append(act.shape[1]))
    with model.force_codes({"blocks.1.hook_resid_post": [5]}):
        model.add_codebook(
            Codebook(CodebookConfig(d_in=16, num_codes=8, hook_name="blocks.0.hook_resid_pre"))
        )
        calls.clear()
        _, cache = model.run_with_cache(tokens)
    assert calls == [tokens.shape[1]]  # the user's hook still runs, once per forward
    assert (cache["blocks.1.hook_resid_post.hook_codes"] == 5).all()  # the force still holds
    assert first.enabled and set(model.codebooks) == {
        "blocks.1.hook_resid_post",
        "blocks.0.hook_resid_pre",
    }


def zero_second_position(act, hook):
    act[:, 1] = 0  # the TransformerLens in-place idiom
    return act


@pytest.mark.parametrize(
    "site, hook_at, n_groups",
    [
        ("blocks.0.hook_resid_post", "blocks.0.hook_resid_post", 1),
        ("blocks.0.attn.hook_z", "blocks.0.attn.hook_z", 4),
        ("blocks.0.hook_resid_post", "blocks.0.hook_resid_post.hook_codebook_out", 1),
        ("blocks.0.attn.hook_z", "blocks.0.attn.hook_z.hook_codebook_out", 4),
    ],
)
def test_in_place_hooks_after_a_codebook_work_with_gradients(
    tiny_cfg, tokens, site, hook_at, n_groups
):
    model = HookedCodebookTransformer(tiny_cfg)
    torch.manual_seed(0)
    cb = model.add_codebook(
        Codebook(CodebookConfig(d_in=16, num_codes=8, k=2, n_groups=n_groups, hook_name=site))
    )
    seen = {}

    def record(act, hook):
        seen[hook.name] = act.detach().clone()

    loss = model.run_with_hooks(
        tokens,
        return_type="loss",
        fwd_hooks=[(hook_at, zero_second_position), (site, record)],
    )
    assert (seen[site][:, 1] == 0).all() and (seen[site][:, 0] != 0).any()
    loss.backward()
    assert cb.codes.grad is not None and cb.codes.grad.abs().sum() > 0
    assert model.W_E.grad is not None and model.W_E.grad.abs().sum() > 0


@pytest.mark.parametrize("cls", [HookedCodebookTransformer, HookedSAETransformer])
@pytest.mark.parametrize("pos_slice, index", [(-1, [-1]), ((1, 3), slice(1, 3)), ([0, 2], [0, 2])])
def test_pos_slice_slices_codebook_hooks_on_their_position_axis(
    tiny_cfg, tokens, cls, pos_slice, index
):
    """TransformerLens picks the position axis by hook-name suffix; codes and a hook_z codebook's
    input/output have theirs elsewhere. Each cached entry is the full one, sliced along pos
    (an int keeps the axis, as TransformerLens does for its own hook points)."""
    model = cls(tiny_cfg)
    torch.manual_seed(0)
    for name, kw in SITES.items():
        attach_codebook(model, Codebook(CodebookConfig(num_codes=24, hook_name=name, **kw)))
    _, full = model.run_with_cache(tokens)
    _, sliced = model.run_with_cache(tokens, pos_slice=pos_slice)
    for site in SITES:
        for suffix in ("", ".hook_codebook_in", ".hook_codes", ".hook_codebook_out"):
            name = site + suffix
            assert torch.equal(sliced[name], full[name][:, index]), name
    b = tokens.shape[0]
    if pos_slice == -1:
        assert sliced["blocks.0.attn.hook_z.hook_codes"].shape == (b, 1, 4, 2)
        assert sliced["blocks.0.attn.hook_z.hook_codebook_in"].shape == (b, 1, 4, 4)
        assert sliced["blocks.1.hook_mlp_out.hook_codes"].shape == (b, 1, 1, 1)
