"""`tl-codebook compare`: codebooks vs SAEs on a TokFSM model, end to end, into a report directory.
Trains a small TokFSM model (or loads one saved by `tl-codebook demo`), caches its activations once,
trains every method on that cache with one budget, and writes the comparison report.

The run directory holds `fsm.json` and `base_model/` (the model; `--model-dir` of a later run
can point here), `store/train` and `store/eval` (the activation caches, SAELens' layout, reused by
a later run into the same directory when they fit the model and hook), `methods/` (every trained
method's weights) and the report (`index.html`, `comparison.json`, ...; see `report`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from transformer_lens import HookedTransformerConfig

from tl_codebook.comparisons.compare import DEFAULT_METHODS, ComparisonConfig, run
from tl_codebook.comparisons.methods import METHOD_KINDS, MethodSpec, TrainingConfig
from tl_codebook.comparisons.metrics import STEERING_POSITIONS, EvalConfig
from tl_codebook.comparisons.report import notes
from tl_codebook.comparisons.store import ActivationStore, StoreError
from tl_codebook.fsm.dataset import TokFSMDataset
from tl_codebook.fsm.machine import FSM, FSMConfig
from tl_codebook.hooks.model import HookedCodebookTransformer

EXAMPLES = (
    """examples:
  # the embedded default: a TokFSM model trained here, 4 methods at k=1 and k=4 (~5 min on 2 cores)
  tl-codebook compare --out runs/compare

  # a model saved by `tl-codebook demo`, another hook, TopK and codebooks only, wider
  tl-codebook compare --model-dir runs/demo --hook blocks.1.hook_resid_post \\
      --method codebook --method topk --d-sae 256 --ks 1,2,4 --out runs/compare-demo

method specs (--method): KIND[:key=value...], KIND one of """
    + ", ".join(METHOD_KINDS)
    + """;
keys d_sae, k, lr, l1_coefficient, l0_coefficient, similarity, n_groups, codebook_init, name.
A spec without k is run once per --ks value (standard and jumprelu take no k: run once)."""
)

BASE_MODEL_DIR = "base_model"
MODEL_WEIGHTS = "model.safetensors"
MODEL_CONFIG = "config.json"


@dataclasses.dataclass
class TokFSMModelConfig:
    """The embedded default model: a small TokFSM and a 2-layer transformer trained on it."""

    n_states: int = 32
    n_edges: int = 4
    base: int = 10
    fsm_seed: int = 0
    seq_len: int = 32
    n_layers: int = 2
    d_model: int = 64
    n_heads: int = 4
    d_mlp: int = 256
    steps: int = 400
    batch_size: int = 64
    lr: float = 3e-3
    seed: int = 0

    def fsm(self) -> FSM:
        return FSM.generate(
            FSMConfig(
                n_states=self.n_states, n_edges=self.n_edges, base=self.base, seed=self.fsm_seed
            )
        )

    def model_config(self, vocab_size: int, device: str) -> dict[str, Any]:
        from tl_codebook.fsm.experiment import tokfsm_model_kwargs

        return tokfsm_model_kwargs(self, vocab_size, device)


def train_tokfsm_model(
    config: TokFSMModelConfig, out_dir: str | Path, device: str = "cpu", progress: bool = True
) -> tuple[HookedCodebookTransformer, FSM, int]:
    """Train the default TokFSM model (plain LM training: joint mode, no codebook sites) and save
    it as `out_dir/fsm.json` + `out_dir/base_model/`; returns (model, fsm, seq_len)."""
    from tl_codebook.training import TrainConfig, train_codebooks

    fsm = config.fsm()
    model_kwargs = config.model_config(fsm.vocab_size, device)
    torch.manual_seed(config.seed)
    model = HookedCodebookTransformer(HookedTransformerConfig(**model_kwargs))
    batches = TokFSMDataset(fsm, seq_len=config.seq_len, seed=config.seed).batches(
        config.batch_size
    )
    train_codebooks(
        model,
        batches,
        TrainConfig(
            mode="joint",
            sites=[],
            steps=config.steps,
            batch_size=config.batch_size,
            lr=config.lr,
            warmup_steps=max(1, config.steps // 10),
            seed=config.seed,
            progress=progress,
            log_every=max(1, config.steps // 10),
        ),
    )
    model.eval()
    out = Path(out_dir)
    (out / BASE_MODEL_DIR).mkdir(parents=True, exist_ok=True)
    fsm.save(out / "fsm.json")
    save_file(
        {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
        str(out / BASE_MODEL_DIR / MODEL_WEIGHTS),
    )
    saved = {k: v for k, v in model_kwargs.items() if k != "device"}
    (out / BASE_MODEL_DIR / MODEL_CONFIG).write_text(
        json.dumps({"model": saved, "tokfsm": dataclasses.asdict(config)}, indent=2)
    )
    return model, fsm, config.seq_len


def load_tokfsm_model(
    model_dir: str | Path, device: str = "cpu"
) -> tuple[HookedCodebookTransformer, FSM, int]:
    """Load a TokFSM model saved by `compare` (base_model/config.json) or by `tl-codebook demo`
    (its metrics.json config); returns (model, fsm, seq_len)."""
    root = Path(model_dir)
    weights = root / BASE_MODEL_DIR / MODEL_WEIGHTS
    for needed in (root / "fsm.json", weights):
        if not needed.is_file():
            raise FileNotFoundError(
                f"--model-dir {root}: {needed.relative_to(root)} is missing; expected a directory "
                "written by `tl-codebook demo` or `tl-codebook compare` (fsm.json, "
                f"{BASE_MODEL_DIR}/{MODEL_WEIGHTS})."
            )
    fsm = FSM.load(root / "fsm.json")
    own = root / BASE_MODEL_DIR / MODEL_CONFIG
    if own.is_file():
        kwargs = json.loads(own.read_text())["model"]
        cfg = HookedTransformerConfig(**kwargs, device=device)
    elif (root / "metrics.json").is_file():
        from tl_codebook.fsm.experiment import ExperimentConfig

        experiment = ExperimentConfig.from_dict(
            json.loads((root / "metrics.json").read_text())["config"]
        )
        cfg = experiment.model_config(fsm.vocab_size, device)
    else:
        raise FileNotFoundError(
            f"--model-dir {root}: no model config; expected {BASE_MODEL_DIR}/{MODEL_CONFIG} "
            "(tl-codebook compare) or metrics.json (tl-codebook demo)."
        )
    model = HookedCodebookTransformer(cfg)
    model.load_state_dict(load_file(str(weights), device=device))
    model.eval()
    return model, fsm, int(cfg.n_ctx)


def open_or_build_store(
    path: Path,
    model: HookedCodebookTransformer,
    tokens: torch.Tensor,
    hook: str,
    fsm: FSM,
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
        metadata={"fsm": fsm.to_dict()},
        overwrite=True,
        progress=progress,
    )


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
        "--model-dir",
        default=None,
        help="a run directory of `tl-codebook demo` or `compare` (default: train a small TokFSM "
        "model here)",
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
    methods.add_argument("--training-tokens", type=int, default=1_048_576)
    methods.add_argument("--batch-size", type=int, default=1024, help="tokens per step")
    methods.add_argument("--lr", type=float, default=3e-3)
    methods.add_argument("--seed", type=int, default=0)
    evaluation = parser.add_argument_group("evaluation")
    evaluation.add_argument("--steering-prompts", type=int, default=256)
    evaluation.add_argument("--steering-positions", default="last", choices=STEERING_POSITIONS)
    evaluation.add_argument("--precise-threshold", type=float, default=0.9)
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


def run_compare_command(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    progress = not args.quiet
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        ks = [int(k) for k in str(args.ks).split(",") if k.strip()]
    except ValueError:
        raise SystemExit(f"--ks must be comma-separated integers, got {args.ks!r}.") from None
    specs = method_specs(args.method or list(DEFAULT_METHODS), ks)
    config = ComparisonConfig(
        training=TrainingConfig(
            hook_name=args.hook,
            d_sae=args.d_sae,
            k=ks[0] if ks else 1,
            training_tokens=args.training_tokens,
            batch_size=args.batch_size,
            lr=args.lr,
            seed=args.seed,
            device=args.device,
            progress=progress,
        ),
        evaluation=EvalConfig(
            steering_prompts=args.steering_prompts,
            steering_positions=args.steering_positions,
            precise_threshold=args.precise_threshold,
            seed=args.seed,
            progress=progress,
        ),
        methods=specs,
    )
    if args.model_dir:
        model, fsm, seq_len = load_tokfsm_model(args.model_dir, device=args.device)
        print(f"Loaded the TokFSM model in {args.model_dir} ({fsm}, seq_len {seq_len}).")
    else:
        print("Training the default TokFSM model ...")
        model, fsm, seq_len = train_tokfsm_model(
            dataclasses.replace(TokFSMModelConfig(), steps=args.lm_steps, seed=args.seed),
            out,
            device=args.device,
            progress=progress,
        )
    config.training.exclude_token_ids = [fsm.bos_token]
    dataset = TokFSMDataset(fsm, seq_len=seq_len, seed=args.seed + 100)
    train_tokens = next(dataset.batches(args.store_sequences))
    eval_tokens = dataset.held_out(args.eval_sequences, seed=args.seed)
    store = open_or_build_store(
        out / "store" / "train", model, train_tokens, args.hook, fsm, progress
    )
    eval_store = open_or_build_store(
        out / "store" / "eval", model, eval_tokens, args.hook, fsm, progress
    )
    result = run(store, None, config, model=model, eval_store=eval_store, fsm=fsm, out_dir=out)
    print(result.to_markdown())
    for note in notes(result):
        print(f"- {note}")
    print(f"Report: {out / 'index.html'} ({time.perf_counter() - started:.0f}s)")
    return 0
