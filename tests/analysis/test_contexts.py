"""Per-code questions on caches with known answers: the embedding-rows codebook at hook_embed
maps each token to its own code (code t fires exactly where token t is)."""

import numpy as np
import pytest
import torch

from tl_codebook import Codebook, CodebookConfig, HookedCodebookTransformer
from tl_codebook.analysis.cache import CodeCache
from tl_codebook.analysis.contexts import (
    code_density,
    cofiring,
    quantile_contexts,
    random_contexts,
    top_contexts,
    topic_codes,
)


def embedding_model(make_tiny_cfg, extra_copy=False):
    """Code t = W_E[t] (cosine, k = 1) at hook_embed; with `extra_copy` the same codebook also
    sits at blocks.0.hook_resid_pre, which equals hook_embed's output in a rotary model (no
    position embedding is added), so each code has a twin that fires at the same positions."""
    model = HookedCodebookTransformer(make_tiny_cfg(positional_embedding_type="rotary"))
    with torch.no_grad():
        for site in ["hook_embed"] + (["blocks.0.hook_resid_pre"] if extra_copy else []):
            cb = Codebook(
                CodebookConfig(d_in=16, num_codes=11, similarity="cosine", hook_name=site)
            )
            cb.codes.copy_(model.W_E[None])
            model.add_codebook(cb)
    return model


@pytest.fixture
def cache_and_tokens(make_tiny_cfg, tmp_path):
    tokens = torch.randint(0, 11, (8, 12), generator=torch.Generator().manual_seed(1))
    model = embedding_model(make_tiny_cfg, extra_copy=True)
    cache = CodeCache.build(model, tokens, tmp_path / "cache", progress=False, scores=True)
    return cache, tokens


def test_top_contexts_of_a_tokens_code_all_sit_on_that_token(cache_and_tokens):
    cache, tokens = cache_and_tokens
    token = int(tokens[0, 0])
    found = top_contexts(cache, "hook_embed", token, n=100, window=3)
    assert len(found) == int((tokens == token).sum())
    for context in found:
        assert context.token_ids[context.center] == token
        assert int(tokens[context.seq, context.pos]) == token
        start = max(0, context.pos - 3)
        assert context.token_ids == tokens[context.seq, start : context.pos + 4].tolist()
        assert context.score == pytest.approx(1.0, abs=1e-3)  # cosine of a row with itself
    best_two = top_contexts(cache, "hook_embed", token, n=2)
    assert len(best_two) == 2
    assert [c.score for c in best_two] == sorted((c.score for c in found), reverse=True)[:2]


def test_random_and_quantile_contexts_are_firings_of_the_code(cache_and_tokens):
    cache, tokens = cache_and_tokens
    token = int(tokens[0, 0])
    firings = {(int(s), int(p)) for s, p in zip(*np.nonzero(tokens.numpy() == token))}
    sample = random_contexts(cache, "hook_embed", token, n=3, seed=0)
    assert len(sample) == min(3, len(firings))
    assert {(c.seq, c.pos) for c in sample} <= firings
    assert random_contexts(cache, "hook_embed", token, n=3, seed=0) == sample
    groups = quantile_contexts(cache, "hook_embed", token, n_quantiles=2)
    seen = {(c.seq, c.pos) for group in groups for c in group}
    assert seen <= firings and seen


def test_density_is_each_tokens_frequency(cache_and_tokens):
    cache, tokens = cache_and_tokens
    expected = torch.bincount(tokens.flatten(), minlength=11).double() / tokens.numel()
    np.testing.assert_allclose(code_density(cache, "hook_embed")[0], expected.numpy())


def test_a_code_co_fires_fully_with_its_twin_in_the_other_codebook(cache_and_tokens):
    cache, tokens = cache_and_tokens
    token = int(tokens[0, 0])
    best = cofiring(cache, "hook_embed", token, top=3)[0]
    assert (best.hook, best.group, best.code) == ("blocks.0.hook_resid_pre", 0, token)
    assert best.jaccard == pytest.approx(1.0)
    assert best.intersection == best.count == int((tokens == token).sum())


def test_topic_codes_find_the_token_that_fills_a_document(make_tiny_cfg, tmp_path):
    tokens = torch.arange(10 * 12).remainder(11).view(10, 12)
    tokens[3] = 5  # document 3 is all token 5; elsewhere each token fills ~1/11 of a row
    model = embedding_model(make_tiny_cfg)
    cache = CodeCache.build(model, tokens, tmp_path / "c", progress=False)
    found = topic_codes(cache, "hook_embed", min_fraction=0.5)
    assert [(t.code, t.seqs, t.fractions) for t in found] == [(5, [3], [1.0])]


def test_a_code_out_of_range_is_named(cache_and_tokens):
    cache, _ = cache_and_tokens
    with pytest.raises(ValueError, match="11"):
        top_contexts(cache, "hook_embed", 11)
