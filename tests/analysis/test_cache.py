"""CodeCache on known answers: a codebook whose codes are the model's own embedding rows, placed
at `hook_embed`, maps every token to its own code, so the cached codes must equal the tokens.

Run as a script (`python -m torch.distributed.run ... test_cache.py OUT`) it is the torchrun
worker of the sharded-build test.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from transformer_lens import HookedTransformerConfig

from tl_codebook import Codebook, CodebookConfig, HookedCodebookTransformer
from tl_codebook.analysis import CodeCache, CodeCacheError, UnknownCacheHookError
from tl_codebook.analysis.cache import MANIFEST, build_index, code_dtype
from tl_codebook.files import TEMP_PREFIX, remove_leftovers
from tl_codebook.snap import code_scores

VOCAB = 11


def tiny_model(seed: int = 0) -> HookedCodebookTransformer:
    cfg = HookedTransformerConfig(
        n_layers=2,
        d_model=16,
        n_ctx=32,
        d_head=4,
        n_heads=4,
        d_mlp=32,
        d_vocab=VOCAB,
        act_fn="relu",
        seed=seed,
        device="cpu",
    )
    return HookedCodebookTransformer(cfg)


def embedding_model(similarity: str = "cosine", seed: int = 0) -> HookedCodebookTransformer:
    """The model's embedding rows as the codes of a k=1 codebook at hook_embed: token t -> code t
    (cosine/euclidean: a vector is nearest itself; inner product would pick the longest row)."""
    model = tiny_model(seed)
    cfg = CodebookConfig(d_in=16, num_codes=VOCAB, k=1, similarity=similarity)
    codebook = Codebook(cfg)
    with torch.no_grad():
        codebook.codes.copy_(model.W_E[None])
    model.add_codebook(codebook, "hook_embed")
    return model


def two_codebook_model() -> HookedCodebookTransformer:
    """The embedding codebook plus a per-head (4 groups, k=3) codebook at blocks.0.attn.hook_z."""
    model = embedding_model()
    cfg = CodebookConfig(d_in=16, num_codes=20, k=3, n_groups=4)
    model.add_codebook(Codebook(cfg), "blocks.0.attn.hook_z")
    return model


def corpus(n_seq: int = 6, seq_len: int = 9, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n_seq, seq_len), generator=torch.Generator().manual_seed(seed))


# -- known answers -----------------------------------------------------------------------------


def test_embedding_codebook_caches_each_token_as_its_own_code(tmp_path):
    model, tokens = embedding_model(), corpus()
    cache = CodeCache.build(model, tokens, tmp_path / "cache", batch_size=4, progress=False)
    assert cache.hooks == ["hook_embed"]
    assert (cache.n_seq, cache.seq_len, cache.n_tokens) == (6, 9, 54)
    codes = cache.codes("hook_embed")
    assert codes.shape == (6, 9, 1, 1) and codes.dtype == np.uint16
    np.testing.assert_array_equal(codes[..., 0, 0], tokens.numpy())
    np.testing.assert_array_equal(cache.tokens, tokens.numpy())
    assert cache.tokens.dtype == np.int32


def test_reopen_is_memory_mapped_with_the_same_ids(tmp_path):
    model, tokens = two_codebook_model(), corpus()
    built = CodeCache.build(model, tokens, tmp_path / "cache", batch_size=4, progress=False)
    reopened = CodeCache.open(tmp_path / "cache")
    assert reopened.hooks == ["hook_embed", "blocks.0.attn.hook_z"]
    for hook in reopened.hooks:
        assert isinstance(reopened.codes(hook), np.memmap)
        assert not reopened.codes(hook).flags.writeable
        np.testing.assert_array_equal(reopened.codes(hook), built.codes(hook))
    assert isinstance(reopened.tokens, np.memmap)
    assert isinstance(reopened.index("hook_embed").positions, np.memmap)


def test_cached_codes_are_the_ids_hook_codes_gives(tmp_path):
    model, tokens = two_codebook_model(), corpus()
    cache = CodeCache.build(model, tokens, tmp_path / "cache", batch_size=4, progress=False)
    _, run = model.run_with_cache(tokens)
    for hook in cache.hooks:
        expected = run[f"{hook}.hook_codes"].numpy()
        assert cache.codes(hook).shape == expected.shape
        np.testing.assert_array_equal(cache.codes(hook), expected)
    assert cache.shape_of("blocks.0.attn.hook_z") == (4, 3, 20)


def test_an_iterable_of_batches_gives_the_same_cache_as_the_tensor(tmp_path):
    model, tokens = two_codebook_model(), corpus()
    whole = CodeCache.build(model, tokens, tmp_path / "whole", batch_size=4, progress=False)
    batches = (batch for batch in tokens.split(4))  # a generator: its length is unknown
    streamed = CodeCache.build(model, batches, tmp_path / "streamed", progress=False)
    np.testing.assert_array_equal(streamed.tokens, whole.tokens)
    for hook in whole.hooks:
        np.testing.assert_array_equal(streamed.codes(hook), whole.codes(hook))
        np.testing.assert_array_equal(streamed.index(hook).offsets, whole.index(hook).offsets)
        np.testing.assert_array_equal(streamed.index(hook).positions, whole.index(hook).positions)
    assert not (tmp_path / "streamed" / "chunks").exists()


def test_numpy_tokens_are_accepted(tmp_path):
    model, tokens = embedding_model(), corpus()
    cache = CodeCache.build(model, tokens.numpy(), tmp_path / "c", progress=False)
    np.testing.assert_array_equal(cache.codes("hook_embed")[..., 0, 0], tokens.numpy())


def test_index_lists_exactly_the_positions_of_each_token(tmp_path):
    model, tokens = embedding_model(), corpus()
    cache = CodeCache.build(model, tokens, tmp_path / "cache", progress=False)
    index = cache.index("hook_embed")
    flat = tokens.numpy().reshape(-1)
    for token in range(VOCAB):
        np.testing.assert_array_equal(index.positions_of(token), np.flatnonzero(flat == token))
    np.testing.assert_array_equal(index.counts(), np.bincount(flat, minlength=VOCAB)[None])
    assert index.offsets.dtype == np.int64 and index.offsets.shape == (VOCAB + 1,)


def test_index_lists_a_position_once_when_a_code_fills_several_of_its_k_slots():
    # 2 sequences x 2 positions, 2 groups, k = 3 (flat positions 0..3)
    codes = np.array(
        [
            [[[1, 1, 0], [2, 0, 0]], [[0, 2, 1], [2, 2, 2]]],
            [[[3, 1, 1], [1, 0, 3]], [[1, 1, 1], [0, 3, 1]]],
        ],
        dtype=np.uint16,
    )
    offsets, positions = build_index(codes, num_codes=4)
    got = {
        (g, c): positions[offsets[g * 4 + c] : offsets[g * 4 + c + 1]].tolist()
        for g in range(2)
        for c in range(4)
    }
    assert got == {
        (0, 0): [0, 1],
        (0, 1): [0, 1, 2, 3],
        (0, 2): [1],
        (0, 3): [2],
        (1, 0): [0, 2, 3],
        (1, 1): [2, 3],
        (1, 2): [0, 1],
        (1, 3): [2, 3],
    }


def test_scores_are_the_similarity_of_each_chosen_code(tmp_path):
    model, tokens = two_codebook_model(), corpus()
    cache = CodeCache.build(model, tokens, tmp_path / "c", scores=True, progress=False)
    # every token's embedding against its own row: cosine 1
    np.testing.assert_allclose(cache.scores("hook_embed"), 1.0, atol=1e-3)
    assert cache.scores("hook_embed").dtype == np.float16
    _, run = model.run_with_cache(tokens)
    hook = "blocks.0.attn.hook_z"
    x = run[f"{hook}.hook_codebook_in"].reshape(-1, 4, 4)
    every = code_scores(x, model.codebooks[hook].codes.detach(), "inner_product")
    ids = torch.from_numpy(cache.codes(hook).astype(np.int64)).reshape(-1, 4, 3)
    expected = every.gather(-1, ids).reshape(cache.scores(hook).shape)
    np.testing.assert_allclose(cache.scores(hook), expected.numpy(), rtol=2e-3, atol=2e-3)
    assert CodeCache.build(model, tokens, tmp_path / "d", progress=False).scores(hook) is None


def test_euclidean_embedding_scores_are_zero(tmp_path):
    model, tokens = embedding_model("euclidean"), corpus()
    cache = CodeCache.build(model, tokens, tmp_path / "c", scores=True, progress=False)
    np.testing.assert_array_equal(cache.codes("hook_embed")[..., 0, 0], tokens.numpy())
    np.testing.assert_allclose(cache.scores("hook_embed"), 0.0, atol=1e-3)


def test_hooks_selects_the_codebooks_cached(tmp_path):
    model, tokens = two_codebook_model(), corpus()
    cache = CodeCache.build(model, tokens, tmp_path / "c", hooks="blocks.0.attn.hook_z")
    assert cache.hooks == ["blocks.0.attn.hook_z"]


def test_the_build_leaves_the_model_as_it_was(tmp_path):
    model, tokens = two_codebook_model(), corpus()
    model.train()
    hits = {name: cb.code_hits.clone() for name, cb in model.codebooks.items()}
    CodeCache.build(model, tokens, tmp_path / "c", progress=False)
    assert model.training
    for name, cb in model.codebooks.items():
        assert torch.equal(cb.code_hits, hits[name]) and cb.track_stats


def test_the_forward_stops_after_the_last_cached_codebook(tmp_path):
    model, tokens = two_codebook_model(), corpus()
    calls = []
    model.add_hook("blocks.1.hook_resid_pre", lambda act, hook: calls.append(1))
    CodeCache.build(model, tokens, tmp_path / "a", hooks="hook_embed", progress=False)
    CodeCache.build(model, tokens, tmp_path / "b", hooks="blocks.0.attn.hook_z", progress=False)
    assert calls == []
    model(tokens[:1])
    assert calls == [1]


# -- sizes -------------------------------------------------------------------------------------


def test_code_dtype_is_the_smallest_unsigned_type():
    assert code_dtype(2) == np.uint16
    assert code_dtype(65_536) == np.uint16
    assert code_dtype(65_537) == np.uint32
    with pytest.raises(ValueError, match="num_codes"):
        code_dtype(0)


def test_more_than_65536_codes_are_stored_as_uint32(tmp_path):
    model = tiny_model()
    model.add_codebook(Codebook(CodebookConfig(d_in=16, num_codes=65_537)), "hook_embed")
    cache = CodeCache.build(model, corpus(2, 3), tmp_path / "c", progress=False)
    assert cache.codes("hook_embed").dtype == np.uint32
    assert cache.manifest["hooks"][0]["dtype"] == "uint32"
    assert cache.index("hook_embed").counts().sum() == 6


def test_a_code_costs_two_bytes_per_token_and_slot(tmp_path):
    model = tiny_model()
    model.add_codebook(Codebook(CodebookConfig(d_in=16, num_codes=1000, k=3)), "hook_embed")
    cache = CodeCache.build(model, corpus(), tmp_path / "c", progress=False)
    codes = cache.codes("hook_embed")
    file = tmp_path / "c" / "codes" / "h00.npy"
    data_bytes = file.stat().st_size - codes.offset  # the file less its .npy header
    assert data_bytes / cache.n_tokens == 2 * 3  # <= 2 k: the reference keeps 8 k (int64)


# -- vocab and text ----------------------------------------------------------------------------


class LetterTokenizer:
    """Decodes token id i to the i-th letter (the one method the cache uses; TransformerLens'
    forward reads padding_side)."""

    padding_side = "right"

    def decode(self, ids):
        return "".join("abcdefghijk"[i] for i in ids)


def test_vocab_is_str_of_the_id_without_a_tokenizer(tmp_path):
    cache = CodeCache.build(embedding_model(), corpus(), tmp_path / "c", progress=False)
    assert cache.vocab == [str(i) for i in range(VOCAB)]
    assert cache.manifest["vocab_size"] == VOCAB


def test_vocab_comes_from_the_tokenizer_one_id_at_a_time(tmp_path):
    model = embedding_model()
    model.tokenizer = LetterTokenizer()
    cache = CodeCache.build(model, corpus(), tmp_path / "c", progress=False)
    assert cache.vocab == list("abcdefghijk")


def test_a_given_vocab_is_saved_and_joins_into_the_text(tmp_path):
    vocab = ["", "a", "bb", "ccc", "<script>", "é", "x", "y", "z", " ", "\n"]
    tokens = torch.tensor([[1, 2, 3], [4, 0, 5]])
    cache = CodeCache.build(embedding_model(), tokens, tmp_path / "c", vocab=vocab)
    assert CodeCache.open(tmp_path / "c").vocab == vocab
    text, starts = cache.text_offsets()
    assert text == "abbccc<script>é"
    assert starts.tolist() == [0, 1, 3, 6, 14, 14, 15]
    assert [text[starts[i] : starts[i + 1]] for i in range(6)] == [
        vocab[t] for t in tokens.reshape(-1).tolist()
    ]


def test_a_vocab_too_short_for_the_corpus_is_refused(tmp_path):
    with pytest.raises(ValueError, match="vocab has 3 strings, but the corpus holds token id"):
        CodeCache.build(embedding_model(), corpus(), tmp_path / "c", vocab=["a", "b", "c"])
    assert not (tmp_path / "c").exists()


# -- atomic writing ----------------------------------------------------------------------------


def batches_then_crash(tokens):
    yield tokens[:2]
    raise RuntimeError("killed midway")


def test_a_build_that_dies_midway_leaves_no_cache(tmp_path):
    model, tokens = embedding_model(), corpus()
    with pytest.raises(RuntimeError, match="killed midway"):
        CodeCache.build(model, batches_then_crash(tokens), tmp_path / "c", progress=False)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(CodeCacheError, match="no code cache"):
        CodeCache.open(tmp_path / "c")


def test_a_build_that_dies_keeps_the_previous_cache(tmp_path):
    model, tokens = embedding_model(), corpus()
    CodeCache.build(model, tokens[:3], tmp_path / "c", progress=False)
    with pytest.raises(RuntimeError, match="killed midway"):
        CodeCache.build(model, batches_then_crash(tokens), tmp_path / "c", progress=False)
    kept = CodeCache.open(tmp_path / "c")
    np.testing.assert_array_equal(kept.tokens, tokens[:3].numpy())


KILLED_BUILD = """
import sys, time
from pathlib import Path
import torch
sys.path.insert(0, {tests!r})
from test_cache import embedding_model, corpus
from tl_codebook.analysis import CodeCache

def batches():
    tokens = corpus()
    yield tokens[:2]
    Path({marker!r}).write_text("first batch done")
    time.sleep(120)
    yield tokens[2:]

CodeCache.build(embedding_model(), batches(), {out!r}, progress=False)
"""


@pytest.mark.slow
def test_a_build_killed_by_sigkill_does_not_open_as_complete(tmp_path):
    marker, out = tmp_path / "marker", tmp_path / "c"
    script = KILLED_BUILD.format(tests=str(Path(__file__).parent), marker=str(marker), out=str(out))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", script], env=env, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "the build never reached its second batch"
            time.sleep(0.1)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(TEMP_PREFIX)]
    assert leftovers  # the killed build's temporary directory, never under the cache's name
    with pytest.raises(CodeCacheError, match="interrupted"):
        CodeCache.open(out)
    remove_leftovers(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["marker"]


# -- bad input ---------------------------------------------------------------------------------


@pytest.fixture
def built(tmp_path):
    return CodeCache.build(two_codebook_model(), corpus(), tmp_path / "cache", progress=False)


def test_an_unknown_hook_lists_the_hooks(built):
    for error in (KeyError, ValueError, UnknownCacheHookError):
        with pytest.raises(error, match=r"hook_embed, blocks\.0\.attn\.hook_z"):
            built.codes("blocks.1.hook_mlp_out")
    with pytest.raises(UnknownCacheHookError, match="holds no codebook at 'nope'"):
        built.index("nope")


def test_a_code_or_group_out_of_range_names_the_range(built):
    built.check_code("blocks.0.attn.hook_z", 19, group=3)
    with pytest.raises(ValueError, match=r"code 20 is out of range .* valid codes are 0\.\.19"):
        built.check_code("blocks.0.attn.hook_z", 20)
    with pytest.raises(ValueError, match=r"group 4 is out of range .* valid groups are 0\.\.3"):
        built.check_code("blocks.0.attn.hook_z", 0, group=4)
    with pytest.raises(ValueError, match=r"code must lie in \[0, 11\)"):
        built.index("hook_embed").positions_of(11)


def test_a_truncated_file_is_named(built):
    file = built.path / "codes" / "h01.npy"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    with pytest.raises(CodeCacheError, match=r"codes/h01\.npy.*truncated"):
        CodeCache.open(built.path)


def test_a_missing_file_is_named(built):
    (built.path / "index" / "h00.positions.npy").unlink()
    with pytest.raises(CodeCacheError, match=r"lacks index/h00\.positions\.npy"):
        CodeCache.open(built.path)


def test_a_file_of_another_shape_than_the_manifest_is_refused(built):
    np.save(built.path / "tokens.npy", np.zeros((6, 8), dtype=np.int32))
    with pytest.raises(CodeCacheError, match=r"tokens\.npy.*int32\[6, 8\].*int32\[6, 9\]"):
        CodeCache.open(built.path)


def rewrite_manifest(path, **changes):
    manifest = json.loads((path / MANIFEST).read_text())
    manifest.update(changes)
    (path / MANIFEST).write_text(json.dumps(manifest))


def test_an_incomplete_manifest_is_refused(built):
    rewrite_manifest(built.path, complete=False)
    with pytest.raises(CodeCacheError, match="incomplete"):
        CodeCache.open(built.path)


def test_an_unknown_format_version_is_refused(built):
    rewrite_manifest(built.path, format_version=99)
    with pytest.raises(CodeCacheError, match="format_version 99.*reads format_version 1"):
        CodeCache.open(built.path)


def test_a_directory_that_is_not_a_cache_is_refused(tmp_path):
    (tmp_path / "plain").mkdir()
    with pytest.raises(CodeCacheError, match="is not a code cache: it has no manifest.json"):
        CodeCache.open(tmp_path / "plain")
    with pytest.raises(CodeCacheError, match="There is no code cache at"):
        CodeCache.open(tmp_path / "absent")


def test_a_cache_for_another_model_is_refused_naming_both(tmp_path):
    model = embedding_model(seed=0)
    CodeCache.build(model, corpus(), tmp_path / "c", progress=False)
    CodeCache.open(tmp_path / "c", model=model)  # its own model: fine
    other = embedding_model(seed=1)
    with pytest.raises(CodeCacheError, match=r"built for the model .*fingerprint .*given"):
        CodeCache.open(tmp_path / "c", model=other)


def test_an_empty_corpus_is_refused(tmp_path):
    model = embedding_model()
    for empty in (torch.zeros(0, 5, dtype=torch.long), torch.zeros(3, 0, dtype=torch.long)):
        with pytest.raises(ValueError, match="corpus is empty"):
            CodeCache.build(model, empty, tmp_path / "c", progress=False)
    with pytest.raises(ValueError, match="corpus is empty"):
        CodeCache.build(model, iter([]), tmp_path / "c", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_batches_of_different_lengths_are_refused(tmp_path):
    batches = [corpus(2, 5), corpus(2, 4)]
    with pytest.raises(ValueError, match="batch 1 has 4 positions, the first had 5"):
        CodeCache.build(embedding_model(), batches, tmp_path / "c", progress=False)


def test_a_model_without_codebooks_is_refused(tmp_path):
    with pytest.raises(ValueError, match="no codebooks"):
        CodeCache.build(tiny_model(), corpus(), tmp_path / "c", progress=False)


def test_hooks_naming_a_non_codebook_lists_the_codebooks(tmp_path):
    with pytest.raises(ValueError, match=r"not a codebook .*: hook_embed, blocks\.0\.attn\.hook_z"):
        CodeCache.build(two_codebook_model(), corpus(), tmp_path / "c", hooks=["hook_pos_embed"])


# -- torchrun ----------------------------------------------------------------------------------


def sharded_corpus() -> torch.Tensor:
    return corpus(n_seq=7, seq_len=5, seed=3)  # 4 batches of 2 (the last of 1) over 2 ranks


@pytest.mark.slow
def test_two_gloo_ranks_build_the_cache_one_process_builds(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    done = subprocess.run(
        [*launch, __file__, str(tmp_path / "sharded")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    single = CodeCache.build(
        two_codebook_model(), sharded_corpus(), tmp_path / "single", batch_size=2, scores=True
    )
    sharded = CodeCache.open(tmp_path / "sharded", model=two_codebook_model())
    np.testing.assert_array_equal(sharded.tokens, single.tokens)
    for hook in single.hooks:
        np.testing.assert_array_equal(sharded.codes(hook), single.codes(hook))
        np.testing.assert_array_equal(sharded.scores(hook), single.scores(hook))
        np.testing.assert_array_equal(sharded.index(hook).offsets, single.index(hook).offsets)
        np.testing.assert_array_equal(sharded.index(hook).positions, single.index(hook).positions)
    shards = sharded.manifest["shards"]
    assert [(s["rank"], s["batches"], s["n_seq"]) for s in shards] == [(0, 2, 4), (1, 2, 3)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sharded", "single"]  # shards removed


if __name__ == "__main__":  # the torchrun worker
    torch.set_num_threads(1)
    CodeCache.build(
        two_codebook_model(),
        sharded_corpus(),
        sys.argv[1],
        batch_size=2,
        scores=True,
        progress=False,
    )
