"""Speed and memory of our snap against a naive autograd floor and a SAELens TopK SAE step.

Run: `python benchmarks/bench_snap.py` (a few minutes on 2 cores) or `--quick` (smoke, ~20 s).
Prints tables as it goes and ONE JSON object on the last line. All results are ratios measured
in the same process, so they survive a noisy shared machine better than absolute times.

What is measured, per shape (flat: one group of d=512; per-head: 8 groups of 64):

* time: one forward+backward step. "ours" is `Codebook.forward` (default config: reconstruction
  gradient on the codes, straight-through on the input, statistics on) on a `[tokens, d]` input
  with requires_grad, loss `(y * g).sum()` for a fixed random g, backward to input and codes.
  The "floor" is the same maths written plainly with autograd, no chunking: the full score
  matrix, `topk`, an advanced-index gather of `[tokens, groups, k, d_group]`, a mean, the
  straight-through trick `q + (x - x.detach())` and the reconstruction loss
  `|q - sg(x)|^2 / tokens`, so both produce the same gradients (checked before timing).
  Steps are interleaved (one of each per round) after warm-up. Ratios are the median over
  rounds of the per-round ratio (paired, so a slow period hits both sides); times are medians.
  `_of_mins` keys give the ratio of the fastest rounds instead (the least-disturbed estimate).

* memory: `torch.profiler` with `profile_memory=True` records every allocation and free made
  by torch's CPU allocator, with its address (including inside `no_grad`, the custom autograd
  Function and backward). The peak of the running sum of those events over one
  forward+backward is the peak memory the step held on top of what existed before it (inputs,
  codes, g). We leave out the allocations that survive the step as `x.grad` and `codes.grad`
  (matched by address), which every implementation must produce, and divide by the size of the
  full score matrix (tokens x groups x codes x 4 bytes). A tokens x codes matrix made at any
  moment, or kept for backward, shows up as a fraction >= 1: the floor is the control (the
  script warns if the floor does not reach 1). Not seen: memory outside torch's allocator (BLAS
  workspaces, std::vector inside topk), small and the same for every variant.
  `_incl_grads` keys give the same peak with the gradients counted.

* SAELens: one `TopKTrainingSAE.training_forward_pass` + backward on the same activations
  (default config, no dead-neuron mask so no aux loss, input without requires_grad), width
  d_sae = num_codes, same k. For the per-head shape the analogue of 8 groups of 10,000 codes
  of size 64 is 8 per-head SAEs (64 -> 10,000, k=8), timed as one step over all heads: the
  flops of the flat SAE, but 8x its elementwise passes over [tokens, 10,000], so several times
  slower. One SAE of width 80,000 on the concatenated 512-d input would do 8x the matmul work
  of ours and is not the same model, so we do not time it. SAE steps are slow, so they run in
  the first few rounds only (paired with those rounds of ours).
  `speedup_vs_topk_sae` = SAE step time / our step time.

The chunk-size sweep (flat shape) reports time ratio and memory fraction for each
`CodebookConfig.chunk_size`, so the default can be picked from measurements. The headline keys
(`snap_ratio_to_floor`, `snap_peak_memory_fraction`, `speedup_vs_topk_sae`) are for the flat
shape at the `CodebookConfig` default chunk size (mid-sweep under `--quick`).
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile

import tl_codebook
from tl_codebook.codebook import Codebook, CodebookConfig

DEFAULT_CHUNK = CodebookConfig.__dataclass_fields__["chunk_size"].default
TARGETS = {"ratio_to_floor": 1.15, "memory_fraction": 1 / 8, "speedup_vs_topk_sae": 5.0}


@dataclass
class Shape:
    name: str
    tokens: int
    d: int
    num_codes: int
    k: int
    n_groups: int

    @property
    def score_bytes(self) -> int:
        return self.tokens * self.n_groups * self.num_codes * 4


# -- the three contenders ---------------------------------------------------------------------


def floor_snap(x: Tensor, codes: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The snap written plainly: full scores, topk, index-gather, mean, straight-through.

    Returns (output, reconstruction loss); the loss gives the codes the same reconstruction
    gradient as `Codebook`'s default `reconstruction_coef=1`.
    """
    groups, _, d_group = codes.shape
    rows = x.view(x.shape[0], groups, d_group)
    keys = codes / codes.norm(dim=-1, keepdim=True)
    scores = torch.einsum("tgd,gcd->tgc", rows, keys)  # [tokens, groups, num_codes]
    ids = scores.topk(k, dim=-1).indices  # [tokens, groups, k]
    group_idx = torch.arange(groups).view(1, groups, 1)
    quantized = codes[group_idx, ids].mean(dim=-2)  # [tokens, groups, d_group]
    out = quantized + (rows - rows.detach())
    recon = (quantized - rows.detach()).pow(2).sum() / x.shape[0]
    return out.view_as(x), recon


def make_ours_step(cb: Codebook, x: Tensor, g: Tensor) -> Callable[[], None]:
    def step() -> None:
        x.grad = cb.codes.grad = None
        (cb(x) * g).sum().backward()

    return step


def make_floor_step(codes: Tensor, k: int, x: Tensor, g: Tensor) -> Callable[[], None]:
    def step() -> None:
        x.grad = codes.grad = None
        out, recon = floor_snap(x, codes, k)
        ((out * g).sum() + recon).backward()

    return step


def make_sae_step(shape: Shape, x: Tensor, tokens: int | None = None) -> Callable[[], None]:
    """One TopKTrainingSAE training step (one SAE per group) on the first `tokens` rows of `x`."""
    from sae_lens.saes.sae import TrainStepInput
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig

    d_group = shape.d // shape.n_groups
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        saes = [
            TopKTrainingSAE(
                TopKTrainingSAEConfig(
                    d_in=d_group, d_sae=shape.num_codes, k=shape.k, dtype="float32", device="cpu"
                )
            )
            for _ in range(shape.n_groups)
        ]
    rows = x.detach()[:tokens].view(-1, shape.n_groups, d_group)
    inputs = [
        TrainStepInput(
            sae_in=rows[:, h].contiguous(),
            coefficients={},
            dead_neuron_mask=None,  # no dead latents yet, so no auxiliary loss
            n_training_steps=0,
            is_logging_step=False,
        )
        for h in range(shape.n_groups)
    ]

    def step() -> None:
        for sae, inp in zip(saes, inputs):
            sae.zero_grad(set_to_none=True)
            sae.training_forward_pass(inp).loss.backward()

    return step


# -- measuring --------------------------------------------------------------------------------


@dataclass
class Contender:
    step: Callable[[], None]
    warmup: Callable[[], None] | None = None
    """Run once before timing; defaults to `step` (a cheaper stand-in saves time for slow ones)."""
    rounds: int | None = None
    """Take part in only the first `rounds` rounds (slow contenders); None: every round."""


def interleaved_times(contenders: dict[str, Contender], rounds: int) -> dict[str, list[float]]:
    """Seconds per step for each round, running one step of each contender per round."""
    for c in contenders.values():
        (c.warmup or c.step)()
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for r in range(rounds):
        for name, c in contenders.items():
            if c.rounds is not None and r >= c.rounds:
                continue
            gc.collect()
            start = time.perf_counter()
            c.step()
            times[name].append(time.perf_counter() - start)
    return times


def paired_ratio(times: dict[str, list[float]], a: str, b: str) -> float:
    """Median over shared rounds of time(a) / time(b): a slow period hits both sides."""
    return statistics.median(ta / tb for ta, tb in zip(times[a], times[b]))


def allocation_events(step: Callable[[], None]) -> list[tuple[int, int]]:
    """(pointer, signed bytes) of every torch CPU allocation and free during `step`, in order."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    allocations = []
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        if node.tag == _EventType.Allocation:
            allocations.append(node)
    allocations.sort(key=lambda e: e.start_time_ns)
    return [(e.extra_fields.ptr, e.extra_fields.alloc_size) for e in allocations]


def peak_extra_bytes(
    step: Callable[[], None], leaves: list[Tensor], grads: Callable[[], list[Tensor]]
) -> dict:
    """Peak bytes held by torch during `step` above what existed before it.

    `raw` counts everything; `net` leaves out the allocations that survive the step as the
    gradients of `leaves` (matched by address), which every implementation must produce.
    The leaves' old gradients are dropped before profiling so their frees do not offset it.
    """
    step()  # warm-up outside the profiler: lazy allocations, autograd caches
    for leaf in leaves:
        leaf.grad = None
    gc.collect()
    events = allocation_events(step)
    grad_ptrs = {t.data_ptr() for t in grads() if t is not None}
    # An allocation at a gradient's address with no later free is that gradient.
    last_at: dict[int, int] = {}
    for i, (ptr, _) in enumerate(events):
        last_at[ptr] = i
    skip = {last_at[p] for p in grad_ptrs if p in last_at and events[last_at[p]][1] > 0}
    raw = max([0, *itertools.accumulate(size for _, size in events)])
    net = max([0, *itertools.accumulate(s for i, (_, s) in enumerate(events) if i not in skip)])
    return {"raw": raw, "net": net}


def check_same_gradients(cb: Codebook, x: Tensor, g: Tensor) -> float:
    """Max relative difference of (x.grad, codes.grad) between ours and the floor."""
    make_ours_step(cb, x, g)()
    ours = (x.grad.clone(), cb.codes.grad.clone())
    make_floor_step(cb.codes, cb.cfg.k, x, g)()
    floor = (x.grad.clone(), cb.codes.grad.clone())
    return max(
        float((a - b).abs().max() / b.abs().max().clamp_min(1e-12)) for a, b in zip(ours, floor)
    )


def setup(shape: Shape, chunk_size: int) -> tuple[Codebook, Tensor, Tensor]:
    torch.manual_seed(0)
    cfg = CodebookConfig(
        d_in=shape.d,
        num_codes=shape.num_codes,
        k=shape.k,
        n_groups=shape.n_groups,
        chunk_size=chunk_size,
    )
    cb = Codebook(cfg)
    x = torch.randn(shape.tokens, shape.d, requires_grad=True)
    g = torch.randn(shape.tokens, shape.d)
    return cb, x, g


def memory_of(step: Callable[[], None], cb: Codebook, x: Tensor, shape: Shape) -> dict:
    mem = peak_extra_bytes(step, [x, cb.codes], lambda: [x.grad, cb.codes.grad])
    return {
        "peak_fraction": mem["net"] / shape.score_bytes,
        "peak_fraction_incl_grads": mem["raw"] / shape.score_bytes,
        "peak_extra_mib": mem["net"] / 2**20,
    }


# -- the benchmark ----------------------------------------------------------------------------


def run_shape(shape: Shape, chunk_sizes: list[int], rounds: int, sae_rounds: int) -> dict:
    """Time floor, SAE and ours at each chunk size (interleaved), then profile memory."""
    print(
        f"\n== {shape.name}: tokens={shape.tokens} d={shape.d} codes={shape.num_codes} "
        f"k={shape.k} n_groups={shape.n_groups}; score matrix "
        f"{shape.score_bytes / 2**20:.1f} MiB =="
    )
    cb, x, g = setup(shape, chunk_sizes[0])
    rel_err = check_same_gradients(cb, x, g)
    print(f"gradients of ours vs floor: max relative difference {rel_err:.1e}")

    # One Codebook per chunk size, all sharing the same codes so every step does the same work.
    books = {}
    for c in chunk_sizes:
        book = Codebook(CodebookConfig(**{**cb.cfg.to_dict(), "chunk_size": c}))
        book.codes = cb.codes
        books[c] = book
    contenders = {
        "floor": Contender(make_floor_step(cb.codes, shape.k, x, g)),
        "sae": Contender(
            make_sae_step(shape, x),
            warmup=make_sae_step(shape, x, tokens=min(shape.tokens, 256)),
            rounds=sae_rounds,
        ),
    }
    for c in chunk_sizes:
        contenders[f"ours@{c}"] = Contender(make_ours_step(books[c], x, g))
    times = interleaved_times(contenders, rounds)
    medians = {name: statistics.median(ts) for name, ts in times.items()}
    mins = {name: min(ts) for name, ts in times.items()}

    floor_mem = memory_of(contenders["floor"].step, cb, x, shape)
    if floor_mem["peak_fraction"] < 1:
        print("WARNING: the floor's peak is below one score matrix; the memory method is off.")
    sae_variant = (
        "one TopKTrainingSAE"
        if shape.n_groups == 1
        else f"{shape.n_groups} per-head TopKTrainingSAEs (d_in={shape.d // shape.n_groups} each)"
    )
    result: dict = {
        "shape": vars(shape),
        "gradient_max_rel_diff": rel_err,
        "floor_s": medians["floor"],
        "floor_peak_memory_fraction": floor_mem["peak_fraction"],
        "floor_peak_memory_fraction_incl_grads": floor_mem["peak_fraction_incl_grads"],
        "sae_s": medians["sae"],
        "sae_variant": sae_variant,
        "rounds": rounds,
        "sae_rounds": sae_rounds,
        "by_chunk_size": {},
    }
    print(
        f"{'variant':>10} {'median s':>9} {'min s':>7} {'/ floor':>8} {'mem frac':>9} "
        f"{'(+grads)':>9} {'SAE/this':>9}"
    )
    print(
        f"{'floor':>10} {medians['floor']:9.3f} {mins['floor']:7.3f} {1.0:8.2f} "
        f"{floor_mem['peak_fraction']:9.3f} {floor_mem['peak_fraction_incl_grads']:9.3f} "
        f"{paired_ratio(times, 'sae', 'floor'):9.2f}"
    )
    print(f"{'SAELens':>10} {medians['sae']:9.3f} {mins['sae']:7.3f}   ({sae_variant})")
    for c in chunk_sizes:
        name = f"ours@{c}"
        mem = memory_of(contenders[name].step, books[c], x, shape)
        entry = {
            "seconds": medians[name],
            "ratio_to_floor": paired_ratio(times, name, "floor"),
            "ratio_to_floor_of_mins": mins[name] / mins["floor"],
            "peak_memory_fraction": mem["peak_fraction"],
            "peak_memory_fraction_incl_grads": mem["peak_fraction_incl_grads"],
            "peak_extra_mib": mem["peak_extra_mib"],
            "speedup_vs_topk_sae": paired_ratio(times, "sae", name),
            "speedup_vs_topk_sae_of_mins": mins["sae"] / mins[name],
        }
        result["by_chunk_size"][c] = entry
        print(
            f"{name:>10} {medians[name]:9.3f} {mins[name]:7.3f} {entry['ratio_to_floor']:8.2f} "
            f"{mem['peak_fraction']:9.3f} {mem['peak_fraction_incl_grads']:9.3f} "
            f"{entry['speedup_vs_topk_sae']:9.2f}"
        )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes, a smoke run")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds per contender")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    if args.quick:
        tokens, d, codes, heads = 256, 64, 1000, 4
        rounds, sae_rounds, sweep = 3, 3, [64, 128, 256]
    else:
        tokens, d, codes, heads = 4096, 512, 10_000, 8
        rounds, sae_rounds, sweep = 11, 5, [256, 512, 1024, 2048, 4096]
    rounds = args.rounds or rounds
    default = sweep[len(sweep) // 2] if args.quick else DEFAULT_CHUNK
    sweep = sorted({*sweep, default})
    flat = Shape("flat", tokens, d, codes, k=8, n_groups=1)
    per_head = Shape("per_head", tokens, d, codes, k=8, n_groups=heads)

    start = time.perf_counter()
    print(f"tl_codebook from {Path(tl_codebook.__file__).parent}; torch threads {args.threads}")
    flat_result = run_shape(flat, sweep, rounds, min(sae_rounds, rounds))
    # 8 per-head SAEs are slow (several times one SAE of the same flops): two rounds.
    head_result = run_shape(per_head, [default], min(rounds, 5), min(rounds, 2))
    headline = flat_result["by_chunk_size"][default]
    head = head_result["by_chunk_size"][default]

    met = {
        "ratio_to_floor": headline["ratio_to_floor"] <= TARGETS["ratio_to_floor"],
        "memory_fraction": headline["peak_memory_fraction"] <= TARGETS["memory_fraction"],
        "speedup_vs_topk_sae": headline["speedup_vs_topk_sae"] >= TARGETS["speedup_vs_topk_sae"],
    }
    which = "the CodebookConfig default" if default == DEFAULT_CHUNK else "mid-sweep"
    print(f"\nheadline: chunk_size={default} ({which}), flat shape")
    print(f"targets {TARGETS}; met: {met}; total {time.perf_counter() - start:.0f} s")
    summary = {
        "snap_ratio_to_floor": headline["ratio_to_floor"],
        "snap_peak_memory_fraction": headline["peak_memory_fraction"],
        "speedup_vs_topk_sae": headline["speedup_vs_topk_sae"],
        "chunk_size": default,
        "targets": TARGETS,
        "targets_met": met,
        "per_head": {
            "snap_ratio_to_floor": head["ratio_to_floor"],
            "snap_peak_memory_fraction": head["peak_memory_fraction"],
            "speedup_vs_topk_sae": head["speedup_vs_topk_sae"],
            **{k: v for k, v in head_result.items() if k != "by_chunk_size"},
            "ours": head,
        },
        "flat": {k: v for k, v in flat_result.items() if k != "by_chunk_size"},
        "chunk_size_sweep": flat_result["by_chunk_size"],
        "quick": args.quick,
        "threads": args.threads,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
