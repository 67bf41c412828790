"""`force_codes` positions while generating: one meaning with and without the KV cache.

A mid-layer codebook is used on purpose: at the last residual a forced code fixes the logits of
its own position whatever the context, so only a codebook upstream of attention shows whether
earlier generated positions were forced or not.
"""

import pytest
import torch
from sae_lens import HookedSAETransformer

from tl_codebook import Codebook, CodebookConfig, HookedCodebookTransformer
from tl_codebook.hooks import attach_codebook, force_codes

MID = "blocks.0.hook_resid_post"
NEW = 6  # tokens generated per call


def mid_layer_model(make_tiny_cfg, positional, cls=HookedCodebookTransformer):
    model = cls(make_tiny_cfg(positional_embedding_type=positional))
    torch.manual_seed(1)
    cb = Codebook(CodebookConfig(d_in=16, num_codes=10, k=1, hook_name=MID))
    if isinstance(model, HookedCodebookTransformer):
        model.add_codebook(cb)
    else:
        attach_codebook(model, cb)
    return model


def generate(model, prompt, cached):
    return model.generate(
        prompt,
        max_new_tokens=NEW,
        do_sample=False,
        stop_at_eos=False,
        verbose=False,
        use_past_kv_cache=cached,
    )


def reference(model, prompt, code, absolute):
    """Greedy decoding by hand: the whole sequence each step, `code` forced at `absolute`."""
    tokens = prompt
    for _ in range(NEW):
        with force_codes(model, {MID: [code]}, positions=absolute):
            logits = model(tokens)
        tokens = torch.cat([tokens, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return tokens


def steering_code(model, prompt, absolute):
    """A code whose forcing changes the greedy continuation (known to exist for this model)."""
    plain = reference(model, prompt, 0, [])
    for code in range(10):
        if not torch.equal(reference(model, prompt, code, absolute), plain):
            return code
    raise AssertionError("no code changes the continuation")


@pytest.mark.parametrize("positional", ["standard", "rotary"])
@pytest.mark.parametrize(
    "positions, absolute",
    [
        ([-1], [3]),  # negative: resolved once against the prompt (length 4)
        ([1, 5], [1, 5]),  # absolute: one in the prompt, one generated
        (range(4, 32), list(range(4, 32))),  # every generated token
    ],
)
def test_cached_and_uncached_generation_force_the_same_positions(
    make_tiny_cfg, tokens, positional, positions, absolute
):
    model = mid_layer_model(make_tiny_cfg, positional)
    prompt = tokens[:, :4]
    code = steering_code(model, prompt, absolute)
    expected = reference(model, prompt, code, absolute)
    with model.force_codes({MID: [code]}, positions=positions):
        cached = generate(model, prompt, cached=True)
        uncached = generate(model, prompt, cached=False)
    assert torch.equal(cached, expected)
    assert torch.equal(uncached, expected)
    assert not torch.equal(expected, generate(model, prompt, cached=True))  # forcing mattered


def test_negative_positions_are_resolved_per_input(make_tiny_cfg, tokens):
    """Two inputs of different lengths in one block: -1 is each one's own last token."""
    model = mid_layer_model(make_tiny_cfg, "rotary")
    with model.force_codes({MID: [7]}, positions=[-1]):
        for length in (5, 3):
            _, cache = model.run_with_cache(tokens[:, :length])
            ids = cache[f"{MID}.hook_codes"][..., 0, 0]
            assert (ids[:, -1] == 7).all()
        first = generate(model, tokens[:, :2], cached=False)
        second = generate(model, tokens[:, :5], cached=False)
    assert torch.equal(first, reference(model, tokens[:, :2], 7, [1]))
    assert torch.equal(second, reference(model, tokens[:, :5], 7, [4]))


def test_positions_after_the_prompt_are_forced_on_a_plain_model_with_kv_cache(
    make_tiny_cfg, tokens
):
    """HookedSAETransformer + attach_codebook: the window offset is known without our subclass."""
    model = mid_layer_model(make_tiny_cfg, "rotary", cls=HookedSAETransformer)
    prompt = tokens[:, :4]
    absolute = [5, 6]
    code = steering_code(model, prompt, absolute)
    seen = []

    def record(ids, hook):
        seen.append(ids[..., 0, 0].clone())

    with force_codes(model, {MID: [code]}, positions=absolute):
        with model.hooks(fwd_hooks=[(f"{MID}.hook_codes", record)]):
            cached = generate(model, prompt, cached=True)
    assert torch.equal(cached, reference(model, prompt, code, absolute))
    # forwards: the prompt (4 positions), then one new token each: positions 4, 5, 6, ...
    assert [s.shape[-1] for s in seen] == [4] + [1] * (NEW - 1)
    assert (seen[2] == code).all() and (seen[3] == code).all()
    assert not (seen[1] == code).all()  # position 4 is not forced


def test_a_bare_int_position_means_that_one_position(make_tiny_cfg, tokens):
    model = mid_layer_model(make_tiny_cfg, "rotary")
    with model.force_codes({MID: [7]}, positions=2):
        _, one = model.run_with_cache(tokens)
    with model.force_codes({MID: [7]}, positions=[2]):
        _, listed = model.run_with_cache(tokens)
    assert torch.equal(one[f"{MID}.hook_codes"], listed[f"{MID}.hook_codes"])
    assert (one[f"{MID}.hook_codes"][:, 2] == 7).all()


@pytest.mark.parametrize(
    "positions, message",
    [
        ([10_000], r"position 10000 can never lie inside the context \(n_ctx=32\)"),
        ([-10_000], r"position -10000 can never lie inside the context \(n_ctx=32\)"),
        ([1.7], r"positions must be integers, got 1.7"),
        ([True], r"positions must be integers, got True"),
        (["3"], r"positions must be integers, got '3'"),
        ("3", r"positions must be integers, got '3'"),
    ],
)
def test_impossible_or_non_integer_positions_are_refused(make_tiny_cfg, positions, message):
    model = mid_layer_model(make_tiny_cfg, "rotary")
    with pytest.raises((ValueError, TypeError), match=message):
        with model.force_codes({MID: [1]}, positions=positions):
            pass


@pytest.mark.parametrize("bad", [1.7, True, "3"])
def test_non_integer_code_ids_are_refused(make_tiny_cfg, bad):
    model = mid_layer_model(make_tiny_cfg, "rotary")
    with pytest.raises(TypeError, match=f"code ids must be integers, got {bad!r}"):
        with model.force_codes({MID: [bad]}):
            pass
    with pytest.raises(TypeError, match=f"code ids must be integers, got {bad!r}"):
        with model.ablate_codes({MID: [bad]}):
            pass
