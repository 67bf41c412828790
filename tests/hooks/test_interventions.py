"""Forcing and ablating codes: known answers on hand-built codebooks, and steering `generate`."""

import pytest
import torch

from tl_codebook import Codebook, CodebookConfig, HookedCodebookTransformer
from tl_codebook.hooks import insert_codes

LAST_RESID = "blocks.1.hook_resid_post"


def test_insert_codes_replaces_the_lowest_ranked_natural_codes():
    ids = torch.tensor([[5, 3, 9, 1], [2, 7, 4, 0]])
    forced = torch.tensor([7, 8])
    # row 0: 7 and 8 new -> keep the two best naturals (5, 3); row 1: 7 already active
    assert insert_codes(ids, forced).tolist() == [[7, 8, 5, 3], [7, 8, 2, 4]]
    assert insert_codes(torch.tensor([[4]]), torch.tensor([1])).tolist() == [[1]]


def model_with_final_codebook(make_tiny_cfg, k=1, positional="rotary"):
    model = HookedCodebookTransformer(make_tiny_cfg(positional_embedding_type=positional))
    torch.manual_seed(1)
    cb = Codebook(CodebookConfig(d_in=16, num_codes=10, k=k, hook_name=LAST_RESID))
    model.add_codebook(cb)
    return model, cb


def test_force_codes_at_positions_shows_in_cache_and_logits(make_tiny_cfg, tokens):
    model, cb = model_with_final_codebook(make_tiny_cfg)
    _, natural = model.run_with_cache(tokens)
    natural_ids = natural[f"{LAST_RESID}.hook_codes"][..., 0, 0]
    forced = 9
    with model.force_codes({LAST_RESID: [forced]}, positions=[2, -1]):
        logits, cache = model.run_with_cache(tokens)
    ids = cache[f"{LAST_RESID}.hook_codes"][..., 0, 0]
    assert (ids[:, [2, -1]] == forced).all()
    other = [p for p in range(tokens.shape[1]) if p not in (2, tokens.shape[1] - 1)]
    assert torch.equal(ids[:, other], natural_ids[:, other])
    # the residual stream at the forced positions is the forced code itself, so the logits there
    # are those of that code vector through ln_final and the unembedding
    expected = model.unembed(model.ln_final(cb.codes[0, forced].view(1, 1, -1)))[0, 0]
    assert torch.allclose(logits[:, 2], expected.expand(tokens.shape[0], -1), atol=1e-5)
    assert torch.allclose(logits[:, -1], expected.expand(tokens.shape[0], -1), atol=1e-5)


@pytest.mark.parametrize("positional", ["standard", "rotary"])
def test_forcing_a_code_steers_generation(make_tiny_cfg, tokens, positional):
    model, cb = model_with_final_codebook(make_tiny_cfg, positional=positional)
    target = model.unembed(model.ln_final(cb.codes[0].unsqueeze(0)))[0].argmax(-1)  # per code
    code = int(torch.nonzero(target != target[0])[0, 0]) if (target != target[0]).any() else 0
    prompt = tokens[:, :3]
    # positions are absolute: from the prompt's last token on, every new token is predicted
    # from a forced position
    with model.force_codes({LAST_RESID: [code]}, positions=range(2, model.cfg.n_ctx)):
        out = model.generate(
            prompt, max_new_tokens=5, do_sample=False, stop_at_eos=False, verbose=False
        )
    assert (out[:, 3:] == target[code]).all()


def test_force_codes_with_k_greater_than_one_keeps_the_best_natural_code(make_tiny_cfg, tokens):
    model, _ = model_with_final_codebook(make_tiny_cfg, k=2)
    _, natural = model.run_with_cache(tokens)
    nat = natural[f"{LAST_RESID}.hook_codes"][..., 0, :]
    forced = 4
    with model.force_codes({LAST_RESID: [forced]}):
        _, cache = model.run_with_cache(tokens)
    ids = cache[f"{LAST_RESID}.hook_codes"][..., 0, :]
    assert (ids[..., 0] == forced).all()
    expected_second = torch.where(nat[..., 0] == forced, nat[..., 1], nat[..., 0])
    assert torch.equal(ids[..., 1], expected_second)


def test_ablated_codes_are_never_chosen_and_next_best_take_over(make_tiny_cfg, tokens):
    model, cb = model_with_final_codebook(make_tiny_cfg, k=1)
    _, natural = model.run_with_cache(tokens)
    x = natural[f"{LAST_RESID}.hook_codebook_in"]
    ranked = cb.scores(x)[..., 0, :].argsort(-1, descending=True)  # [b, p, codes]
    top = ranked[..., 0].unique().tolist()
    with model.ablate_codes({LAST_RESID: top}):
        _, cache = model.run_with_cache(tokens)
        gen = model.generate(
            tokens[:, :2], max_new_tokens=3, do_sample=False, stop_at_eos=False, verbose=False
        )
    ids = cache[f"{LAST_RESID}.hook_codes"][..., 0, 0]
    assert not torch.isin(ids, torch.tensor(top)).any()
    # each token's new code is its best code outside the ablated set
    allowed = ~torch.isin(ranked, torch.tensor(top))
    first_allowed = allowed.float().argmax(-1, keepdim=True)
    assert torch.equal(ids, ranked.gather(-1, first_allowed)[..., 0])
    assert cb.ablated is None and gen.shape == (tokens.shape[0], 5)


def test_bad_interventions_raise_clear_errors(make_tiny_cfg):
    model, _ = model_with_final_codebook(make_tiny_cfg, k=1)
    with pytest.raises(ValueError, match=r"code id\(s\) \[10\] out of range; valid ids are 0..9"):
        with model.force_codes({LAST_RESID: [10]}):
            pass
    with pytest.raises(ValueError, match="cannot force .* with k=1"):
        with model.force_codes({LAST_RESID: [1, 2]}):
            pass
    with pytest.raises(ValueError, match="no codebook named 'blocks.0.hook_resid_post'"):
        with model.ablate_codes({"blocks.0.hook_resid_post": [1]}):
            pass
    with pytest.raises(ValueError, match="leaves fewer than k=1"):
        with model.ablate_codes({LAST_RESID: list(range(10))}):
            pass
    assert model.codebooks[LAST_RESID].ablated is None


def test_two_codebooks_at_once_cache_ablate_and_force(make_tiny_cfg, tokens):
    """Ablate at a residual codebook and force per head at a later hook_z codebook, together."""
    model = HookedCodebookTransformer(make_tiny_cfg())
    torch.manual_seed(2)
    resid = model.add_codebook(
        Codebook(CodebookConfig(d_in=16, num_codes=10, k=2, hook_name="blocks.0.hook_resid_post"))
    )
    heads = model.add_codebook(
        Codebook(
            CodebookConfig(d_in=16, num_codes=6, k=1, n_groups=4, hook_name="blocks.1.attn.hook_z")
        )
    )
    b, p = tokens.shape
    _, cache = model.run_with_cache(tokens)
    shapes = {
        "blocks.0.hook_resid_post.hook_codebook_in": (b, p, 16),
        "blocks.0.hook_resid_post.hook_codes": (b, p, 1, 2),
        "blocks.0.hook_resid_post.hook_codebook_out": (b, p, 16),
        "blocks.1.attn.hook_z.hook_codebook_in": (b, p, 4, 4),
        "blocks.1.attn.hook_z.hook_codes": (b, p, 4, 1),
        "blocks.1.attn.hook_z.hook_codebook_out": (b, p, 4, 4),
    }
    assert {name: tuple(cache[name].shape) for name in shapes} == shapes
    ablated = cache["blocks.0.hook_resid_post.hook_codes"][..., 0, 0].unique().tolist()[:3]
    with (
        model.ablate_codes({"blocks.0.hook_resid_post": ablated}),
        model.force_codes({"blocks.1.attn.hook_z": {0: [3], 2: [5]}}),
    ):
        _, both = model.run_with_cache(tokens)
    ids0 = both["blocks.0.hook_resid_post.hook_codes"][..., 0, :]
    ranked = resid.scores(both["blocks.0.hook_resid_post.hook_codebook_in"])[..., 0, :]
    ranked[..., ablated] = float("-inf")
    assert torch.equal(ids0, ranked.topk(2, dim=-1).indices)  # the best two not ablated
    ids1 = both["blocks.1.attn.hook_z.hook_codes"][..., 0]
    natural = heads.encode(both["blocks.1.attn.hook_z.hook_codebook_in"])[..., 0]
    assert (ids1[..., 0] == 3).all() and (ids1[..., 2] == 5).all()
    assert torch.equal(ids1[..., [1, 3]], natural[..., [1, 3]])
    assert resid.ablated is None
