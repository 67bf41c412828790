"""Defect 18: `tl-codebook train --seed` decides the result (same seed: bit-identical codebooks;
another seed: other codebooks), through the command line as a user runs it."""

import json

import torch

from tl_codebook import HookedCodebookTransformer
from tl_codebook.cli import main


def test_train_seed_flag_controls_the_saved_codebooks(tmp_path, tiny_cfg):
    cfg_path = tmp_path / "model.json"
    cfg_path.write_text(json.dumps(tiny_cfg.to_dict(), default=str))
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(0, 11, (12,), generator=g).tolist() for _ in range(32)]
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps({"tokens": r}) for r in rows))

    def train(seed, name):
        out = tmp_path / name
        argv = [
            "train", "--model", str(cfg_path), "--dataset", str(data), "--mode", "frozen",
            "--at", "hook_mlp_out", "--num-codes", "16", "--steps", "3", "--batch-size", "4",
            "--seq-len", "12", "--seed", str(seed), "--out", str(out), "--quiet",
        ]  # fmt: skip
        assert main(argv) == 0
        model = HookedCodebookTransformer(tiny_cfg)
        model.load_codebooks(out / "codebooks")
        return {name: cb.codes.detach() for name, cb in model.codebooks.items()}

    first, again, other = train(1, "a"), train(1, "b"), train(2, "c")
    assert sorted(first) == ["blocks.0.hook_mlp_out", "blocks.1.hook_mlp_out"]
    assert all(torch.equal(first[n], again[n]) for n in first)
    assert not any(torch.equal(first[n], other[n]) for n in first)
