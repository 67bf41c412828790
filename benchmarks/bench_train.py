"""Training-step cost: codebooks on every attention and MLP site vs the plain model, and a
frozen-mode codebook step vs a SAELens TopK SAE step on the same cached activations.

Run: `python benchmarks/bench_train.py` (about a minute on 2 cores) or `--quick`. Prints a table
and ONE JSON object on the last line. Ratios come from steps interleaved in one process (the
median of per-round ratios), so a noisy shared machine hits both sides alike.

1. `train_step_ratio_vs_plain`: one joint training step (`Trainer.step`: forward, LM loss,
   backward, AdamW) of a 4-layer, d_model 128, 4-head, d_mlp 512 rotary model with codebooks on
   every layer's `attn.hook_z` (one group per head) and `hook_mlp_out` (the paper's TokFSM
   setting: 1000 codes, k=1), divided by the same step without codebooks. Target <= 1.3.
   `train_step_ratio_to_floor`: the same codebook step divided by the plain step plus the bare
   work no implementation can avoid, measured in the same rounds at the same shapes: per
   codebook the score matmuls of all tokens against all codes (in the codebook's row chunks),
   the top-k (a max for k=1), and the gather-mean of the chosen codes forward and backward.
   Target <= 1.1.
2. `frozen_step_speedup_vs_topk_sae`: one frozen-mode codebook step (snap, reconstruction MSE,
   backward, AdamW) on cached `hook_mlp_out` activations vs one SAELens `TopKTrainingSAE`
   training step (training_forward_pass, backward, AdamW) at equal width and k on the same
   activations. Target >= 5.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F

warnings.filterwarnings("ignore", category=DeprecationWarning)

from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig  # noqa: E402
from transformer_lens import HookedTransformerConfig  # noqa: E402

from tl_codebook import Codebook, CodebookConfig, HookedCodebookTransformer  # noqa: E402
from tl_codebook.training import TrainConfig  # noqa: E402
from tl_codebook.training.trainer import Trainer  # noqa: E402


def timed(fn: Callable[[], None]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def paired_ratio(
    slow: Callable[[], None], fast: Callable[[], None], rounds: int
) -> tuple[float, float, float]:
    """Median over rounds of slow/fast, with median times; one warm-up round first."""
    slow(), fast()
    ratios, slow_times, fast_times = [], [], []
    for _ in range(rounds):
        a, b = timed(slow), timed(fast)
        ratios.append(a / b)
        slow_times.append(a)
        fast_times.append(b)
    return statistics.median(ratios), statistics.median(slow_times), statistics.median(fast_times)


def model_config(quick: bool) -> HookedTransformerConfig:
    return HookedTransformerConfig(
        n_layers=4, d_model=128, n_heads=4, d_head=32, d_mlp=512, d_vocab=11,
        n_ctx=128, act_fn="gelu", positional_embedding_type="rotary", seed=0, device="cpu",
    )  # fmt: skip


def trainer_step_fn(sites: list[str], tokens: torch.Tensor, quick: bool) -> tuple[
    Callable[[], None], dict[str, Codebook]
]:  # fmt: skip
    """The trainer's own joint step (`Trainer.step`) on a fresh model with codebooks at `sites`."""
    model = HookedCodebookTransformer(model_config(quick))
    config = TrainConfig(
        mode="joint", sites=sites, num_codes=1000, k=1, lr=1e-4, steps=10**9, progress=False
    )
    trainer = Trainer(model, iter(()), config)
    trainer.inputs.begin(trainer._is_codebook)
    model.train()

    def step() -> None:
        trainer.step(model, tokens)

    return step, dict(trainer.codebooks)


def best(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Top-k ids of the last axis; for k=1 the max, about 3x faster than topk(1) on CPU."""
    if k == 1:
        return scores.max(-1, keepdim=True).indices
    return scores.topk(k, dim=-1).indices


def bare_codebook_work_fn(codebooks: dict[str, Codebook], n_tokens: int) -> Callable[[], None]:
    """Per codebook, at its shapes: scores of all tokens against all codes (batched matmuls over
    chunks of `chunk_size` tokens), the top-k, and the gather-mean of the chosen codes, forward
    and backward. No normalisation, statistics, checks or hooks: what any implementation pays."""
    g = torch.Generator().manual_seed(2)
    work = []
    for cb in codebooks.values():
        c = cb.cfg
        x = torch.randn(c.n_groups, n_tokens, c.d_group, generator=g)
        codes = torch.randn(c.n_groups, c.num_codes, c.d_group, generator=g, requires_grad=True)
        offsets = (torch.arange(c.n_groups) * c.num_codes).view(c.n_groups, 1, 1)
        grad = torch.randn(c.n_groups * n_tokens, c.d_group, generator=g)
        work.append((x, codes, offsets, grad, c.k, c.chunk_size))

    def bare() -> None:
        for x, codes, offsets, grad, k, chunk in work:
            with torch.no_grad():  # in row chunks, as the codebook does: faster than all at once
                keys = codes.transpose(1, 2)
                ids = torch.cat(
                    [
                        best(torch.bmm(x[:, i : i + chunk], keys), k)
                        for i in range(0, x.shape[1], chunk)
                    ],
                    dim=1,
                )
            flat = (ids + offsets).reshape(-1, k)
            table = codes.reshape(-1, codes.shape[-1])
            F.embedding_bag(flat, table, mode="mean").backward(grad)
            codes.grad = None

    return bare


def bench_joint(quick: bool, rounds: int) -> dict[str, float]:
    batch = 8 if quick else 32
    tokens = torch.randint(0, 11, (batch, 128), generator=torch.Generator().manual_seed(0))
    with_codebooks, codebooks = trainer_step_fn(
        ["attn.hook_z:group", "hook_mlp_out"], tokens, quick
    )
    plain, _ = trainer_step_fn([], tokens, quick)
    bare = bare_codebook_work_fn(codebooks, tokens.numel())
    with_codebooks(), plain(), bare()  # warm-up
    to_plain, to_floor, t_cb, t_plain, t_bare = [], [], [], [], []
    for _ in range(rounds):
        a, b, c = timed(with_codebooks), timed(plain), timed(bare)
        to_plain.append(a / b)
        to_floor.append(a / (b + c))
        t_cb.append(a)
        t_plain.append(b)
        t_bare.append(c)
    ratio, floor_ratio = statistics.median(to_plain), statistics.median(to_floor)
    ms = {name: statistics.median(t) * 1e3 for name, t in
          (("cb", t_cb), ("plain", t_plain), ("bare", t_bare))}  # fmt: skip
    print(f"joint step, {len(codebooks)} codebooks, {tokens.numel()} tokens: "
          f"{ms['cb']:.1f} ms vs plain {ms['plain']:.1f} ms -> {ratio:.3f}x; "
          f"floor (plain + bare score/top-k/gather {ms['bare']:.1f} ms) -> {floor_ratio:.3f}x")  # fmt: skip
    return {
        "train_step_ratio_vs_plain": ratio,
        "train_step_ratio_to_floor": floor_ratio,
        "train_step_ms_codebooks": ms["cb"],
        "train_step_ms_plain": ms["plain"],
        "train_step_ms_bare_codebook_work": ms["bare"],
        "train_tokens_per_step": float(tokens.numel()),
    }


def bench_frozen_vs_sae(quick: bool, rounds: int) -> dict[str, float]:
    n_tokens, d, width, k = (1024 if quick else 4096), 128, 1000, 1
    acts = torch.randn(n_tokens, d, generator=torch.Generator().manual_seed(1))
    cb = Codebook(CodebookConfig(d_in=d, num_codes=width, k=k))
    cb.snap_gradient_terms = False
    cb_opt = torch.optim.AdamW(cb.parameters(), lr=1e-3)

    def codebook_step() -> None:
        loss = (cb(acts) - acts).pow(2).mean()
        loss.backward()
        cb_opt.step()
        cb_opt.zero_grad(set_to_none=True)

    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d, d_sae=width, k=k, device="cpu"))
    sae_opt = torch.optim.AdamW(sae.parameters(), lr=1e-3)

    def sae_step() -> None:
        from sae_lens.saes.sae import TrainStepInput

        out = sae.training_forward_pass(
            TrainStepInput(
                sae_in=acts,
                coefficients={},
                dead_neuron_mask=None,
                n_training_steps=0,
                is_logging_step=False,
            )
        )
        out.loss.backward()
        sae_opt.step()
        sae_opt.zero_grad(set_to_none=True)

    ratio, t_sae, t_cb = paired_ratio(sae_step, codebook_step, rounds)
    print(f"frozen step on {n_tokens} cached activations, width {width}, k={k}: "
          f"codebook {t_cb * 1e3:.2f} ms vs TopK SAE {t_sae * 1e3:.2f} ms -> {ratio:.2f}x faster")  # fmt: skip
    return {
        "frozen_step_speedup_vs_topk_sae": ratio,
        "frozen_step_ms_codebook": t_cb * 1e3,
        "frozen_step_ms_topk_sae": t_sae * 1e3,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small shapes, a smoke run")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rounds = args.rounds or (3 if args.quick else 9)
    results = {"threads": args.threads, "rounds": rounds, "quick": args.quick}
    results.update(bench_joint(args.quick, rounds))
    results.update(bench_frozen_vs_sae(args.quick, rounds * 3))
    print(json.dumps(results))


if __name__ == "__main__":
    main()
