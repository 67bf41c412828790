"""`tl-codebook compare`: codebooks vs SAEs on a task's model, end to end, into a report directory.
Trains the task's small default model (or loads one saved by `tl-codebook demo`/`compare`),
caches its activations once, trains every method on that cache with one budget, and writes the
comparison report. The task (`--task`, default TokFSM) comes from `tl_codebook.tasks`' registry:
this module never imports a particular task.

Every user error (a bad flag, a method spec that cannot train, a damaged `--model-dir` file) is a
ValueError raised before any training, printed as one line by `tl-codebook`.

The run directory holds the task's model (TokFSM: `fsm.json` and `base_model/`; `--model-dir` of
a later run can point here), `store/train` and `store/eval` (the activation caches, SAELens'
layout, reused by a later run into the same directory when they fit the model, hook and tokens),
`methods/` (every trained method's weights) and the report (`index.html`, `comparison.json`, ...;
see `report`). The directory is locked while a run writes it.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import torch

from tl_codebook.comparisons.compare import (
    DEFAULT_METHODS,
    SUMMARY_COLUMNS,
    ComparisonConfig,
    run,
)
from tl_codebook.comparisons.methods import METHOD_KINDS, MethodSpec, TrainingConfig
from tl_codebook.comparisons.metrics import STEERING_POSITIONS, EvalConfig
from tl_codebook.comparisons.report import notes
from tl_codebook.comparisons.store import ActivationStore, StoreError
from tl_codebook.files import locked_run_dir
from tl_codebook.tasks import TASKS, Task, task_class

EXAMPLES = (
    """examples:
  # the embedded default: a TokFSM model trained here, 4 methods at k=1 and k=4 (~2 min on 2 cores)
  tl-codebook compare --out runs/compare

  # a model saved by `tl-codebook demo`, another hook, TopK and codebooks only, wider
  tl-codebook compare --model-dir runs/demo --hook blocks.1.hook_resid_post \\
      --method codebook --method topk --d-sae 256 --ks 1,2,4 --out runs/compare-demo

method specs (--method): KIND[:key=value...], KIND one of """
    + ", ".join(METHOD_KINDS)
    + """;
keys d_sae, k, lr, l1_coefficient, l0_coefficient, similarity, n_groups, codebook_init, name
(name: letters, digits, '.', '_' and '-' only: it names the method's directory).
A spec without k is run once per --ks value (standard and jumprelu take no k: run once)."""
)


def open_or_build_store(
    path: Path,
    model: torch.nn.Module,
    tokens: torch.Tensor,
    hook: str,
    task: Task,
    progress: bool,
) -> ActivationStore:
    """Reuse the store at `path` when it was built from this model, at this hook, on these
    tokens; otherwise (re)build it."""
    try:
        store = ActivationStore.open(path, model=model, hooks=[hook])
        if store.n_sequences == tokens.shape[0] and torch.equal(store.tokens(), tokens.long()):
            return store
    except StoreError:
        pass
    return ActivationStore.build(
        model,
        tokens,
        [hook],
        path,
        metadata={"task": task.to_dict()},
        overwrite=True,
        progress=progress,
    )


def parse_ks(text: str) -> list[int]:
    """`--ks`: comma-separated integers >= 1."""
    try:
        ks = [int(k) for k in str(text).split(",") if k.strip()]
    except ValueError:
        raise ValueError(f"--ks must be comma-separated integers, got {text!r}.") from None
    if not ks or min(ks) < 1:
        raise ValueError(f"--ks must list integers >= 1, got {text!r}.")
    return ks


def method_specs(texts: list[str], ks: list[int]) -> list[MethodSpec]:
    """Parse `--method` specs; a spec without k runs once per k in `ks` (if its kind takes k)."""
    specs = []
    for text in texts:
        spec = MethodSpec.parse(text)
        if spec.k is not None or spec.kind in ("standard", "jumprelu"):
            specs.append(spec)
        else:
            specs.extend(dataclasses.replace(spec, k=k) for k in ks)
    return specs


def add_compare_command(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EXAMPLES
    model = parser.add_argument_group("model and data")
    model.add_argument(
        "--task",
        default="tokfsm",
        choices=sorted(TASKS),
        help="the task: its data, concept labels and steering measure (default: tokfsm)",
    )
    model.add_argument(
        "--model-dir",
        default=None,
        help="a run directory of `tl-codebook demo` or `compare` (default: train the task's "
        "small model here)",
    )
    model.add_argument("--lm-steps", type=int, default=400, help="steps for the default model")
    model.add_argument("--hook", default="blocks.0.hook_resid_post", help="hook to compare at")
    model.add_argument("--store-sequences", type=int, default=4096, help="training store size")
    model.add_argument("--eval-sequences", type=int, default=512, help="held-out store size")
    methods = parser.add_argument_group("methods (one matched budget)")
    methods.add_argument(
        "--method",
        action="append",
        default=None,
        metavar="SPEC",
        help=f"method spec, repeatable (default: {', '.join(DEFAULT_METHODS)})",
    )
    methods.add_argument(
        "--ks", default="1,4", help="k values for specs without one (default: 1,4)"
    )
    methods.add_argument("--d-sae", type=int, default=128, help="latents / codes per method")
    methods.add_argument(
        "--training-tokens",
        type=int,
        default=1_048_576,
        help="activations (tokens) each method trains on; epochs over the store repeat as needed",
    )
    methods.add_argument("--batch-size", type=int, default=1024, help="tokens per step")
    methods.add_argument(
        "--lr",
        type=float,
        default=3e-3,
        help="learning rate (Adam, constant) for specs without their own lr",
    )
    methods.add_argument(
        "--seed",
        type=int,
        default=0,
        help="random seed of every method's training and of the steering trials",
    )
    evaluation = parser.add_argument_group("evaluation")
    evaluation.add_argument(
        "--steering-prompts",
        type=int,
        default=256,
        help="prompts steered per method (each towards a concept the task draws)",
    )
    evaluation.add_argument(
        "--steering-positions",
        default="last",
        choices=STEERING_POSITIONS,
        help="last: where the prompt's concept becomes known; generation: from there on, every "
        "position that predicts a generated token",
    )
    evaluation.add_argument(
        "--precise-threshold",
        type=float,
        default=0.9,
        help="a concept has a precise latent when one latent's precision and recall for it "
        "are both at least this (0 to 1)",
    )
    run_group = parser.add_argument_group("run")
    run_group.add_argument("--out", default="runs/compare", help="run and report directory")
    run_group.add_argument("--device", default="cpu", help="cpu, cuda, ... (default: cpu)")
    run_group.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: these models are tiny, and extra threads only "
        "contend on a shared machine)",
    )
    run_group.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(func=run_compare_command)


POSITIVE_FLAGS = (
    "lm_steps",
    "store_sequences",
    "eval_sequences",
    "d_sae",
    "training_tokens",
    "batch_size",
    "steering_prompts",
    "threads",
)


def check_args(args: argparse.Namespace) -> None:
    """Flags that must be integers >= 1 (a 0-token store fails deep inside otherwise)."""
    for name in POSITIVE_FLAGS:
        value = getattr(args, name)
        if value < 1:
            flag = "--" + name.replace("_", "-")
            raise ValueError(f"{flag} must be an integer >= 1, got {value}.")


def comparison_config(args: argparse.Namespace, progress: bool) -> ComparisonConfig:
    """The ComparisonConfig of the flags, every method spec resolved and checked (sizes, names)."""
    ks = parse_ks(args.ks)
    training = TrainingConfig(
        hook_name=args.hook,
        d_sae=args.d_sae,
        k=ks[0],
        training_tokens=args.training_tokens,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        device=args.device,
        progress=progress,
    )
    specs = method_specs(args.method or list(DEFAULT_METHODS), ks)
    for spec in specs:
        spec.resolved(training)  # k > d_sae, n_groups not dividing d_sae, ...: refused now
    return ComparisonConfig(
        training=training,
        evaluation=EvalConfig(
            steering_prompts=args.steering_prompts,
            steering_positions=args.steering_positions,
            precise_threshold=args.precise_threshold,
            seed=args.seed,
            progress=progress,
        ),
        methods=specs,
    )


def run_compare_command(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    check_args(args)
    progress = not args.quiet
    config = comparison_config(args, progress)
    cls = task_class(args.task)
    out = Path(args.out)
    with locked_run_dir(out):
        if args.device == "cpu":
            torch.set_num_threads(args.threads)
        if args.model_dir:
            model, task = cls.load_model(args.model_dir, device=args.device)
            print(f"Loaded the {args.task} model in {args.model_dir} ({task}).")
        else:
            print(f"Training the default {args.task} model ...")
            model, task = cls.train_default_model(
                out, steps=args.lm_steps, seed=args.seed, device=args.device, progress=progress
            )
        config.training.exclude_token_ids = list(task.exclude_token_ids)
        train_tokens = task.tokens(args.store_sequences, "train", seed=args.seed)
        eval_tokens = task.tokens(args.eval_sequences, "eval", seed=args.seed)
        store = open_or_build_store(
            out / "store" / "train", model, train_tokens, args.hook, task, progress
        )
        eval_store = open_or_build_store(
            out / "store" / "eval", model, eval_tokens, args.hook, task, progress
        )
        result = run(
            store, None, config, model=model, eval_store=eval_store, task=task, out_dir=out
        )
    print(result.to_markdown(SUMMARY_COLUMNS))
    for note in notes(result):
        print(f"- {note}")
    print(f"Report: {out / 'index.html'} ({time.perf_counter() - started:.0f}s)")
    return 0
