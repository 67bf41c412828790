"""Run by tests/training/test_distributed.py, under torchrun (2 ranks) or alone (1 process).

`ddp_worker.py OUT DEAD_CODE_EVERY`: trains a tiny model for a few steps on fixed global batches
and saves each rank's parameters. `ddp_worker.py cli AUDIT_DIR OUT -- TRAIN_ARGS...`: runs
`tl-codebook train TRAIN_ARGS --out OUT` and records every write this rank makes under OUT
(Python audit events: opens for writing, renames, mkdirs, removals) in AUDIT_DIR/rank{R}.json.
"""

import atexit
import json
import os
import sys
import warnings
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformer_lens import HookedTransformerConfig

from tl_codebook import HookedCodebookTransformer
from tl_codebook.training import TrainConfig, parse_site, train_codebooks
from tl_codebook.training.distributed import DistInfo, init_distributed

warnings.simplefilter("ignore", DeprecationWarning)


def record_group_state_at_exit(out_dir: str) -> None:
    """Registered before `init_distributed`, so (atexit runs last-in first-out) it runs after any
    exit handler that function registers: it records whether the process group still exists."""

    def record() -> None:
        rank, world = os.environ.get("RANK", "0"), os.environ.get("WORLD_SIZE", "1")
        alive = torch.distributed.is_initialized()
        (Path(out_dir) / f"rank{rank}-of-{world}-exit.json").write_text(
            json.dumps({"group_alive": alive})
        )

    atexit.register(record)


def main(out_dir: str, dead_code_every: int) -> None:
    torch.set_num_threads(1)
    record_group_state_at_exit(out_dir)
    info: DistInfo = init_distributed(torch.device("cpu"))
    cfg = HookedTransformerConfig(
        n_layers=2,
        d_model=16,
        n_ctx=32,
        d_head=4,
        n_heads=4,
        d_mlp=32,
        d_vocab=11,
        act_fn="relu",
        seed=0,
        device="cpu",
    )
    model = HookedCodebookTransformer(cfg)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 11, (8, 12), generator=g) for _ in range(12)]
    config = TrainConfig(
        mode="joint",
        sites=[parse_site("hook_mlp_out:k=2"), parse_site("attn.hook_z:group:layers=0")],
        num_codes=16,
        steps=6,
        lr=3e-3,
        codebook_init="activations",
        init_batches=2,
        dead_code_every=dead_code_every,
        progress=False,
    )
    train_codebooks(model, batches, config)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(Path(out_dir) / f"rank{info.rank}-of-{info.world_size}.safetensors"))


WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def cli_main(audit_dir: str, out_dir: str, train_args: list[str]) -> int:
    from tl_codebook.cli import main as tl_codebook_main

    out = os.path.realpath(out_dir)
    writes: list[list[str]] = []

    def under_out(path: object) -> bool:
        if isinstance(path, int) or path is None:
            return False
        return os.path.realpath(os.fsdecode(path)).startswith(out)

    def audit(event: str, args: tuple) -> None:
        if event == "open":
            path, mode, flags = args
            writing = (mode is not None and any(c in str(mode) for c in "wax+")) or (
                mode is None and isinstance(flags, int) and flags & WRITE_FLAGS
            )
            if writing and under_out(path):
                writes.append([event, os.fsdecode(path)])
        elif event == "os.rename":  # os.rename and os.replace
            for path in args[:2]:
                if under_out(path):
                    writes.append([event, os.fsdecode(path)])
        elif event in ("os.mkdir", "os.remove", "os.rmdir", "shutil.rmtree"):
            if under_out(args[0]):
                writes.append([event, os.fsdecode(args[0])])

    rank = int(os.environ.get("RANK", "0"))
    sys.addaudithook(audit)
    code = tl_codebook_main(["train", *train_args, "--out", out_dir])
    with open(os.path.join(audit_dir, f"rank{rank}.json"), "w") as file:
        json.dump(writes, file)
    return code


if __name__ == "__main__":
    if sys.argv[1] == "cli":
        sys.exit(cli_main(sys.argv[2], sys.argv[3], sys.argv[5:]))
    main(sys.argv[1], int(sys.argv[2]))
