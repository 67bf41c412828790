"""The command line on the real parts, end to end: `tl-codebook train` on SmolLM2-135M (GGUF) over
BBC News, then `tl-codebook cache` over the held-out articles, read back against the model."""

import json

import numpy as np
import torch

from tl_codebook.analysis.cache import CodeCache
from tl_codebook.cli import main
from tl_codebook.io import load_model
from tl_codebook.training.data import token_batches

HOOK = "blocks.6.attn.hook_z"


def test_train_then_cache_smollm2_on_bbc_news(tmp_path):
    run, cache_dir = tmp_path / "run", tmp_path / "cache"
    train = [
        "train",
        "--model",
        "smollm2-135m",
        "--dataset",
        "bbc-news",
        "--at",
        "attn.hook_z:group",
    ]
    train += ["--layers", "6", "--num-codes", "64", "--k", "8", "--mode", "frozen", "--steps", "3"]
    train += ["--batch-size", "4", "--seq-len", "32", "--codebook-init", "activations"]
    assert main([*train, "--out", str(run), "--quiet"]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["codebooks"] == [HOOK]

    cache = ["cache", str(run), "--data", "bbc-news", "--split", "test", "--seq-len", "32"]
    assert main([*cache, "--max-sequences", "8", "--out", str(cache_dir), "--quiet"]) == 0
    opened = CodeCache.open(cache_dir)
    assert (opened.n_seq, opened.seq_len, opened.hooks) == (8, 32, [HOOK])

    model = load_model("smollm2-135m", device="cpu")
    model.load_codebooks(run / "codebooks")
    # the cache holds the held-out split's first 8 packed rows...
    rows = next(iter(token_batches("bbc-news", 8, 32, tokenizer=model.tokenizer, split="test")))
    assert np.array_equal(np.asarray(opened.tokens), rows.numpy())
    # ...and the ids the model's own codebook gives them (9 query heads, 8 codes each)
    with torch.no_grad():
        _, cache = model.run_with_cache(rows, names_filter=f"{HOOK}.hook_codes")
    ids = cache[f"{HOOK}.hook_codes"]
    assert ids.shape == (8, 32, 9, 8)
    cached = np.asarray(opened.codes(HOOK))
    assert np.array_equal(np.sort(cached, axis=-1), np.sort(ids.numpy(), axis=-1))
