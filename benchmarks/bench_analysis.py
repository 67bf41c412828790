"""Benchmark of the code cache and its queries (issue "Analysis"), as ratios and seconds in one run.

* `cache_build_ratio`: `CodeCache.build` time over the bare forward pass of the same model with
  its codebooks on the same batches (no grad, stopped after the last codebook's block, as the
  build does), interleaved rounds, medians. Target <= 1.15: writing ids must not slow the pass.
* `search_seconds_1m`: a regex-free token-set search over >= 1M cached tokens and 8 codebooks of
  1,000 codes (target < 1 s); `search_regex_seconds_1m` the same query as a regex (warm: the
  corpus text is joined once per cache, on the first regex search, and not timed here).
* `top_contexts_seconds`: top contexts of one code on that cache (target < 0.05 s).
* `bytes_per_token_per_codebook`: the codes' bytes on disk / (tokens x codebooks).

The model is small (4 layers, d_model 32, vocab 512) so that 1M tokens build in well under a
minute on two cores; 8 codebooks of 1,000 codes, k = 1, at every layer's resid_mid and resid_post.
The last line printed is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformer_lens import HookedTransformerConfig

from tl_codebook import Codebook, CodebookConfig, HookedCodebookTransformer
from tl_codebook.analysis import CodeCache

SEQ_LEN = 128
VOCAB = 512


def make_model() -> HookedCodebookTransformer:
    torch.manual_seed(0)
    cfg = HookedTransformerConfig(
        n_layers=4, d_model=32, n_ctx=SEQ_LEN, d_head=8, n_heads=4, d_mlp=128,
        d_vocab=VOCAB, act_fn="gelu", positional_embedding_type="rotary", device="cpu",
    )  # fmt: skip
    model = HookedCodebookTransformer(cfg)
    for layer in range(4):
        for site in ("hook_resid_mid", "hook_resid_post"):
            name = f"blocks.{layer}.{site}"
            model.add_codebook(Codebook(CodebookConfig(d_in=32, num_codes=1000, hook_name=name)))
    return model.eval()


def bare_forward(model: HookedCodebookTransformer, batches: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for batch in batches:
            model(batch, stop_at_layer=None)


def timed(fn) -> float:  # noqa: ANN001
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=1 << 20, help="tokens in the search cache")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = make_model()
    g = torch.Generator().manual_seed(0)
    root = Path(tempfile.mkdtemp(prefix="bench-analysis-"))
    try:
        # build vs bare forward: 64 sequences of 128 tokens in batches of 16, interleaved
        small = torch.randint(0, VOCAB, (64, SEQ_LEN), generator=g)
        batches = list(small.split(16))
        build_s, bare_s = [], []
        for r in range(args.rounds):
            bare_s.append(timed(lambda: bare_forward(model, batches)))
            target = root / f"small-{r}"
            build_s.append(
                timed(
                    lambda target=target: CodeCache.build(
                        model, iter(batches), target, batch_size=16, progress=False
                    )
                )
            )
        ratio = statistics.median(b / f for b, f in zip(build_s, bare_s))
        print(f"cache build {statistics.median(build_s):.3f} s vs bare forward "
              f"{statistics.median(bare_s):.3f} s -> {ratio:.3f}x")  # fmt: skip

        # a >= 1M-token cache for the queries
        n_seq = -(-args.tokens // SEQ_LEN)
        tokens = torch.randint(0, VOCAB, (n_seq, SEQ_LEN), generator=g)
        started = time.perf_counter()
        vocab = [f" t{i}" for i in range(VOCAB)]  # separated, so a regex can name whole tokens
        big = CodeCache.build(
            model, tokens, root / "big", batch_size=256, vocab=vocab, progress=False
        )
        print(f"built {big.n_tokens} tokens x {len(big.hooks)} codebooks in "
              f"{time.perf_counter() - started:.1f} s")  # fmt: skip
        query = [3, 17, 200]
        big.search(tokens=query)  # warm the page cache and the index
        search_s = statistics.median(timed(lambda: big.search(tokens=query)) for _ in range(3))
        regex = r" t(?:3|17|200)(?!\d)"  # the same positions as the token query
        same = [(m.hook, m.code) for m in big.search(regex=regex)] == [
            (m.hook, m.code) for m in big.search(tokens=query)
        ]
        regex_s = statistics.median(timed(lambda: big.search(regex=regex)) for _ in range(3))
        hook = big.hooks[3]
        code = int(big.codes(hook)[0, 0, 0, 0])
        big.top_contexts(hook, code)
        contexts_s = statistics.median(
            timed(lambda: big.top_contexts(hook, code)) for _ in range(5)
        )
        code_bytes = sum(
            p.stat().st_size for p in (root / "big").rglob("*.npy") if p.parent.name == "codes"
        )
        bytes_per = code_bytes / (big.n_tokens * len(big.hooks))
        print(f"search {search_s:.3f} s (regex {regex_s:.3f} s, same codes: {same}); "
              f"top contexts {contexts_s * 1000:.1f} ms; {bytes_per:.3f} bytes/token/codebook")  # fmt: skip
        print(
            json.dumps(
                {
                    "threads": args.threads,
                    "cache_build_ratio": ratio,
                    "search_tokens": big.n_tokens,
                    "search_seconds_1m": search_s,
                    "search_regex_seconds_1m": regex_s,
                    "regex_and_token_search_agree": same,
                    "top_contexts_seconds": contexts_s,
                    "bytes_per_token_per_codebook": bytes_per,
                    "targets": {
                        "cache_build_ratio": 1.15,
                        "search_seconds_1m": 1.0,
                        "top_contexts_seconds": 0.05,
                        "bytes_per_token_per_codebook": 2.0,
                    },
                }
            )
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
