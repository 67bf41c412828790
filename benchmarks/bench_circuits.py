"""Benchmark of the circuit methods' cost against model width (issue "Circuits"), one run.

Each method runs on random attention-only models of two layers with 2, 4, 8, 16 and 32 heads per
layer (4 to 64 heads, 13 to 1,153 edges), ten prompt pairs, three interleaved rounds; the
figures are medians. Reported as ratios on this machine:

* `codes_over_acdc[h]`: the codes method's seconds over ACDC's at h heads (target < 1 at every
  width: codes must be faster than ACDC);
* `growth[method]`: seconds at the widest model over seconds at the narrowest (exact patching
  and ACDC run one forward pass per edge and grow with the edge count; the gradient methods and
  codes run a fixed handful of passes);
* `passes[method]`: forward passes at the widest model.

The last line printed is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from tl_codebook.comparisons.circuits.scaling import time_against_heads


def main() -> None:
    """Run the benchmark and print its JSON figures last."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--heads", nargs="+", type=int, default=[2, 4, 8, 16, 32])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rounds = [time_against_heads(args.heads) for _ in range(args.rounds)]
    seconds: dict[tuple[str, int], float] = {}
    passes: dict[tuple[str, int], int] = {}
    for key in {(r["method"], r["heads"]) for r in rounds[0]}:
        values = [r["seconds"] for rows in rounds for r in rows if (r["method"], r["heads"]) == key]
        seconds[key] = statistics.median(values)
        passes[key] = next(
            r["forward_passes"] for r in rounds[0] if (r["method"], r["heads"]) == key
        )
    widths = sorted({h for _, h in seconds})
    methods = sorted({m for m, _ in seconds})
    figures = {
        "heads": widths,
        "codes_over_acdc": {h: round(seconds["codes", h] / seconds["acdc", h], 4) for h in widths},
        "growth": {
            m: round(seconds[m, widths[-1]] / max(seconds[m, widths[0]], 1e-6), 2)
            for m in methods
            if m != "random"
        },
        "passes": {m: passes[m, widths[-1]] for m in methods},
        "seconds_widest": {m: round(seconds[m, widths[-1]], 4) for m in methods},
    }
    for method in methods:
        print(method, [round(seconds[method, h], 4) for h in widths])
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
