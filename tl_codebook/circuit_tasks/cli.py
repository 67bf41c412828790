"""`tl-codebook circuits --out DIR`: every circuit-discovery method on every circuit task, scored
against the true circuits, into circuits.json, plots and index.html.

The default (three induction seeds, the compiled program, the one-head model; 50 prompts; the
node AUROC at 5, 10, 20 and 50 prompts; timings on models of 4 to 64 heads) runs in minutes on
two CPU cores. circuits.json is rewritten after each task, so a killed run keeps what it had
finished; a finished run is refused unless `--overwrite` (an unfinished one is redone).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from tl_codebook.circuit_tasks import CIRCUIT_TASKS, SEEDED_MODELS
from tl_codebook.comparisons.circuits.compare import (
    auroc_by_examples,
    check_methods,
    compare_methods,
    summarize,
    task_family,
)
from tl_codebook.comparisons.circuits.methods import METHODS, MethodOptions
from tl_codebook.comparisons.circuits.report import write_report
from tl_codebook.comparisons.circuits.scaling import time_against_heads
from tl_codebook.configs import check_choice
from tl_codebook.files import atomic_write_json, locked_run_dir

HELP = "Codes against circuit-discovery methods on models whose circuits are known."

EXAMPLES = """examples:
  tl-codebook circuits --out runs/circuits                 # the CPU default (minutes)
  tl-codebook circuits --out runs/c --tasks induction --seeds 0 --methods codes acdc random
method names: """ + ", ".join(METHODS)


def add_circuits_command(parser: argparse.ArgumentParser) -> None:
    """Add `tl-codebook circuits`'s arguments to `parser` and set its function."""
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EXAMPLES
    parser.add_argument("--out", required=True, type=Path, help="run directory to write")
    parser.add_argument(
        "--tasks",
        nargs="+",
        default=list(CIRCUIT_TASKS),
        help=f"task families (default: all of {', '.join(CIRCUIT_TASKS)})",
    )
    parser.add_argument(
        "--methods", nargs="+", default=list(METHODS), help="methods (default: all)"
    )
    parser.add_argument(
        "--seeds",
        nargs="+",
        type=int,
        default=[0, 1, 2],
        help="induction models (shipped: 0 1 2); other tasks use the first",
    )
    parser.add_argument("--prompts", type=int, default=50, help="prompt pairs per task")
    parser.add_argument(
        "--examples",
        nargs="*",
        type=int,
        default=[5, 10, 20, 50],
        help="prompt counts for node AUROC against examples (none: skip)",
    )
    parser.add_argument(
        "--scaling-heads",
        nargs="*",
        type=int,
        default=[2, 4, 8, 16, 32],
        help="heads per layer of the timing models (none: skip)",
    )
    parser.add_argument(
        "--num-codes",
        type=int,
        default=MethodOptions.num_codes,
        help="codes per head of the codes method's codebooks",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--overwrite", action="store_true", help="replace a finished run")
    parser.set_defaults(func=run_circuits_command)


def run_circuits_command(args: argparse.Namespace) -> int:
    """Run the comparison `args` describe and write its report; returns the exit code."""
    for task in args.tasks:
        check_choice("circuit task", task, CIRCUIT_TASKS)
    methods = check_methods(args.methods)
    if args.prompts < 2:
        raise ValueError(f"--prompts must be at least 2, got {args.prompts}.")
    if args.threads:
        torch.set_num_threads(args.threads)
    out: Path = args.out
    with locked_run_dir(out):
        done = out / "circuits.json"
        if _finished(done) and not args.overwrite:
            raise ValueError(f"{done} holds a finished run. Pass --overwrite to replace it.")
        data = run_circuits(
            out,
            args.tasks,
            methods,
            args.seeds,
            args.prompts,
            args.examples,
            args.scaling_heads,
            MethodOptions(num_codes=args.num_codes),
        )
    print(
        f"circuits: {len(data['rows'])} rows in {done}; report {out / 'index.html'} "
        f"({data['seconds']:.0f} s)"
    )
    return 0


def run_circuits(
    out: Path,
    families: list[str],
    methods: list[str],
    seeds: list[int],
    n_prompts: int,
    example_counts: list[int],
    scaling_heads: list[int],
    options: MethodOptions,
) -> dict[str, Any]:
    """Every method on every task, then the examples curve and the timings; circuits.json
    rewritten after each step, the report at the end. Returns what circuits.json holds."""
    start = time.perf_counter()
    data: dict[str, Any] = {
        "methods": methods,
        "rows": [],
        "examples": [],
        "scaling": [],
        "summary": [],
        "task_notes": {},
        "seconds": 0.0,
    }
    results = []
    truths: dict[str, Any] = {}
    jobs = [(f, s) for f in families for s in (seeds if f in SEEDED_MODELS else seeds[:1])]
    for family, seed in tqdm(jobs, desc="circuit tasks"):
        task = CIRCUIT_TASKS[family](seed, n_prompts)
        truths[task.name] = task.true_nodes
        data["task_notes"][task.name] = task.notes
        task_results = compare_methods(task, methods, options)
        results.extend(task_results)
        data["rows"].extend(r.row() for r in task_results)
        if example_counts:
            counts = sorted(c for c in example_counts if c <= task.n)
            data["examples"].extend(auroc_by_examples(task, counts, methods, options))
        _save(out, data, start)
    data["summary"] = summarize(data["rows"], task_family)
    if scaling_heads:
        data["scaling"] = time_against_heads(scaling_heads, methods, options)
    write_report(out, data, results, truths)
    data["finished"] = True
    _save(out, data, start)
    return data


def _finished(path: Path) -> bool:
    """Whether `path` is the circuits.json of a run that reached its end (a killed run's
    partial file is simply redone)."""
    try:
        return bool(json.loads(path.read_text()).get("finished"))
    except (OSError, ValueError, AttributeError):
        return False


def _save(out: Path, data: dict[str, Any], start: float) -> None:
    data["seconds"] = time.perf_counter() - start
    atomic_write_json(out / "circuits.json", data, digits=6)
