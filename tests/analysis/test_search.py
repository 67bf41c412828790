"""Code search on caches whose answers are known: a codebook made of the model's own embedding
rows at hook_embed maps every token to its own code, one made of the position embeddings at
hook_pos_embed maps every token to its position."""

import re

import numpy as np
import pytest
import torch

from tl_codebook import Codebook, CodebookConfig, HookedCodebookTransformer
from tl_codebook.analysis.cache import CodeCache
from tl_codebook.analysis.search import regex_mask, search, token_mask

VOCAB = ["ab", "c", "de", "f", "gh", "i", "jk", "l", "mn", "o", "pq"]


def identity_model(make_tiny_cfg, n_groups=1, positions=False):
    """Codebooks whose codes are the embedding rows (code = token id) and, with `positions`,
    the position embedding rows (code = position); cosine similarity, k = 1."""
    model = HookedCodebookTransformer(make_tiny_cfg())
    with torch.no_grad():
        cfg = CodebookConfig(
            d_in=16, num_codes=11, similarity="cosine", n_groups=n_groups, hook_name="hook_embed"
        )
        embed = Codebook(cfg)
        embed.codes.copy_(model.W_E.reshape(11, n_groups, 16 // n_groups).transpose(0, 1))
        model.add_codebook(embed)
        if positions:
            cfg = CodebookConfig(
                d_in=16, num_codes=32, similarity="euclidean", hook_name="hook_pos_embed"
            )
            pos = Codebook(cfg)
            pos.codes.copy_(model.W_pos[None])
            model.add_codebook(pos)
    return model


def corpus(n_seq=6, seq_len=10, seed=0):
    return torch.randint(0, 11, (n_seq, seq_len), generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def embed_cache(make_tiny_cfg, tmp_path):
    tokens = corpus()
    model = identity_model(make_tiny_cfg, positions=True)
    return CodeCache.build(model, tokens, tmp_path / "cache", vocab=VOCAB, progress=False), tokens


def test_the_cache_holds_each_tokens_own_code(embed_cache):
    cache, tokens = embed_cache
    assert np.array_equal(cache.codes("hook_embed")[..., 0, 0], tokens.numpy())
    positions = np.broadcast_to(np.arange(tokens.shape[1]), tokens.shape)
    assert np.array_equal(cache.codes("hook_pos_embed")[..., 0, 0], positions)


def test_search_for_a_token_finds_exactly_its_code(embed_cache):
    cache, tokens = embed_cache
    token = int(tokens[0, 0])
    found = search(cache, "hook_embed", tokens=[token])
    best = found[0]
    assert (best.hook, best.group, best.code) == ("hook_embed", 0, token)
    assert (best.precision, best.recall, best.f1) == (1.0, 1.0, 1.0)
    assert best.count == best.true_positives == int((tokens == token).sum())
    assert [m.f1 for m in found[1:]] == []  # no other embedding code fires on that token


def test_search_over_every_codebook_ranks_by_f1(embed_cache):
    cache, tokens = embed_cache
    token = int(tokens[0, 0])
    found = search(cache, tokens=token, top=None)
    assert (found[0].hook, found[0].code) == ("hook_embed", token)
    # the position codes: code p fires on every sequence's position p (n_seq times)
    n_seq, seq_len = tokens.shape
    hits = (tokens == token).sum(dim=0)  # occurrences of the token at each position
    expected = {
        p: (hits[p].item() / n_seq, hits[p].item() / (tokens == token).sum().item())
        for p in range(seq_len)
        if hits[p] > 0
    }
    positional = {m.code: (m.precision, m.recall) for m in found if m.hook == "hook_pos_embed"}
    assert sorted(positional) == sorted(expected)
    for code, (precision, recall) in expected.items():
        assert positional[code] == pytest.approx((precision, recall))
    assert [m.f1 for m in found] == sorted((m.f1 for m in found), reverse=True)
    assert all(m.count == n_seq for m in found if m.hook == "hook_pos_embed")


def test_ties_in_f1_go_to_the_code_with_more_firings(make_tiny_cfg, tmp_path):
    # searched: the first token of sequences 0 and 1 (tokens 5 and 6, each seen only there)
    tokens = torch.tensor([[5, 0, 0], [6, 0, 0], [0, 0, 0], [0, 0, 0]])
    cache = CodeCache.build(
        identity_model(make_tiny_cfg, positions=True), tokens, tmp_path / "c", progress=False
    )
    mask = torch.zeros(4, 3, dtype=torch.bool)
    mask[:2, 0] = True
    found = search(cache, mask=mask)
    # position code 0: 2 of its 4 firings (P 1/2, R 1); tokens 5 and 6: 1 of 1 (P 1, R 1/2)
    assert [(m.hook, m.code, m.true_positives, m.count) for m in found] == [
        ("hook_pos_embed", 0, 2, 4),
        ("hook_embed", 5, 1, 1),
        ("hook_embed", 6, 1, 1),
    ]
    assert [m.f1 for m in found] == pytest.approx([2 / 3] * 3)


def test_groups_each_find_the_token(make_tiny_cfg, tmp_path):
    tokens = corpus(seed=1)
    cache = CodeCache.build(
        identity_model(make_tiny_cfg, n_groups=2), tokens, tmp_path / "c", progress=False
    )
    token = int(tokens[1, 3])
    found = search(cache, tokens=[token], min_precision=1.0, min_recall=1.0)
    assert [(m.group, m.code, m.precision, m.recall) for m in found] == [
        (0, token, 1.0, 1.0),
        (1, token, 1.0, 1.0),
    ]


def test_filters_and_top(embed_cache):
    cache, tokens = embed_cache
    two = [int(tokens[0, 0]), int(tokens[0, 1])]
    if two[0] == two[1]:
        two[1] = (two[1] + 1) % 11
    found = search(cache, "hook_embed", tokens=two, top=None)
    assert {m.code for m in found} == set(two)
    assert all(m.precision == 1.0 for m in found)
    counts = {t: int((tokens == t).sum()) for t in two}
    assert {m.code: m.recall for m in found} == pytest.approx(
        {t: c / sum(counts.values()) for t, c in counts.items()}
    )
    assert len(search(cache, "hook_embed", tokens=two, top=1)) == 1
    high = max(counts.values()) / sum(counts.values())
    kept = search(cache, "hook_embed", tokens=two, min_recall=high)
    assert [m.code for m in kept] == [max(counts, key=counts.get)]
    assert search(cache, tokens=two, min_precision=1.0, min_recall=1.0) == []


def test_mask_search_matches_token_search(embed_cache):
    cache, tokens = embed_cache
    token = int(tokens[2, 5])
    by_mask = search(cache, mask=tokens == token, top=None)
    by_array = search(cache, mask=(tokens == token).numpy(), top=None)
    assert by_mask == by_array == search(cache, tokens=[token], top=None)


def test_no_labelled_position_gives_no_codes(embed_cache):
    cache, tokens = embed_cache
    assert search(cache, mask=np.zeros(tokens.shape, dtype=bool)) == []
    assert search(cache, regex="zzz") == []


# -- regex: character spans map to the tokens they cover ------------------------------------


@pytest.fixture
def text_cache(make_tiny_cfg, tmp_path):
    """Two sequences over VOCAB: "ab c de f" -> "abcdef" and "gh ab c ab" -> "ghabcab"."""
    tokens = torch.tensor([[0, 1, 2, 3], [4, 0, 1, 0]])
    model = identity_model(make_tiny_cfg)
    return CodeCache.build(model, tokens, tmp_path / "text", vocab=VOCAB, progress=False)


def test_regex_labels_every_token_a_match_covers(text_cache):
    # "bcd" starts inside "ab" and ends inside "de": all three tokens
    assert regex_mask(text_cache, "bcd").tolist() == [
        [True, True, True, False],
        [False, False, False, False],
    ]
    # one-character matches label one token each; "c" twice
    assert regex_mask(text_cache, "c").tolist() == [
        [False, True, False, False],
        [False, False, True, False],
    ]
    # a match ending exactly at a token boundary does not spill into the next token
    assert regex_mask(text_cache, "abc").tolist() == [
        [True, True, False, False],
        [False, True, True, False],
    ]


def test_regex_capture_group_one_decides_the_span(text_cache):
    assert regex_mask(text_cache, "a(bc)d").tolist() == [
        [True, True, False, False],
        [False, False, False, False],
    ]
    assert regex_mask(text_cache, "h(a)").tolist() == [
        [False, False, False, False],
        [False, True, False, False],
    ]


def test_regex_never_spans_two_sequences(text_cache):
    # "abcdef" + "ghabcab" joined would contain "fg"; each sequence is searched on its own
    assert not regex_mask(text_cache, "fg").any()
    assert regex_mask(text_cache, "^gh").tolist()[1] == [True, False, False, False]
    assert regex_mask(text_cache, "ab$").tolist() == [
        [False, False, False, False],
        [False, False, False, True],
    ]


def test_regex_search_finds_the_tokens_codes(text_cache):
    found = search(text_cache, regex="de|gh")
    assert sorted((m.code, m.precision, m.recall) for m in found) == [
        (2, 1.0, 0.5),
        (4, 1.0, 0.5),
    ]


def test_token_mask(text_cache):
    assert token_mask(text_cache, [0, 3]).tolist() == [
        [True, False, False, True],
        [False, True, False, True],
    ]
    assert token_mask(text_cache, torch.tensor(2)).sum() == 1


# -- bad input ------------------------------------------------------------------------------


def test_a_regex_that_does_not_compile_is_named(text_cache):
    with pytest.raises(ValueError, match=re.escape("regex 'a(b' does not compile: missing )")):
        search(text_cache, regex="a(b")


def test_exactly_one_query(text_cache):
    with pytest.raises(ValueError, match="exactly one of tokens=, regex= or mask=; got none"):
        search(text_cache)
    with pytest.raises(ValueError, match="got tokens, regex"):
        search(text_cache, tokens=[1], regex="a")


def test_a_mask_of_the_wrong_shape_names_both_shapes(text_cache):
    with pytest.raises(ValueError, match=r"mask has shape \(4, 2\) but .* shape \(2, 4\)"):
        search(text_cache, mask=torch.ones(4, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"mask has shape \(8,\)"):
        search(text_cache, mask=np.ones(8, dtype=bool))
    with pytest.raises(TypeError, match="mask must be boolean, got dtype int64"):
        search(text_cache, mask=np.ones((2, 4), dtype=np.int64))


def test_token_ids_out_of_range(text_cache):
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 10\] .* got \[11, 12\]"):
        search(text_cache, tokens=[3, 12, 11])
    with pytest.raises(ValueError, match=r"got \[-1\]"):
        search(text_cache, tokens=-1)
    with pytest.raises(ValueError, match="tokens is empty"):
        search(text_cache, tokens=[])


def test_unknown_hook_and_bad_filters(text_cache):
    with pytest.raises(KeyError, match="holds: hook_embed"):
        search(text_cache, "blocks.0.hook_mlp_out", tokens=[1])
    with pytest.raises(ValueError, match=r"min_precision must be in \[0, 1\], got 1.5"):
        search(text_cache, tokens=[1], min_precision=1.5)
    with pytest.raises(ValueError, match="top must be an integer >= 1 or None, got 0"):
        search(text_cache, tokens=[1], top=0)
