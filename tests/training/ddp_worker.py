"""Run by tests/training/test_distributed.py, under torchrun (2 ranks) or alone (1 process).

Trains a tiny model for a few steps on fixed global batches and saves each rank's parameters.
"""

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


def main(out_dir: str, dead_code_every: int) -> None:
    torch.set_num_threads(1)
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


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
