"""Data-parallel training under torchrun (2 gloo ranks) against one process on the whole batch."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tl_codebook.training.distributed import (
    DistInfo,
    ddp_device_kwargs,
    device_for_rank,
    dist_info_from_env,
    init_distributed,
)

WORKER = Path(__file__).with_name("ddp_worker.py")


def run(out: Path, ranks: int, dead_code_every: int) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if ranks == 1:
        command = [sys.executable, str(WORKER), str(out), str(dead_code_every)]
        env.pop("WORLD_SIZE", None)
    else:
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={ranks}",
            str(WORKER),
            str(out),
            str(dead_code_every),
        ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.slow
def test_two_gloo_ranks_match_one_process_on_the_concatenated_batch(tmp_path):
    run(tmp_path, 1, dead_code_every=0)
    run(tmp_path, 2, dead_code_every=0)
    single = load_file(str(tmp_path / "rank0-of-1.safetensors"))
    rank0 = load_file(str(tmp_path / "rank0-of-2.safetensors"))
    rank1 = load_file(str(tmp_path / "rank1-of-2.safetensors"))
    for name, value in single.items():
        assert torch.equal(rank0[name], rank1[name]), name
        if name.endswith("attn.b_K"):
            # Softmax ignores a shift shared by all keys, so b_K's true gradient is 0; Adam
            # normalises the ~1e-9 rounding noise into lr-sized steps that differ between runs.
            continue
        assert torch.allclose(rank0[name], value, atol=1e-5, rtol=1e-4), name
    # Each rank's group was destroyed before interpreter teardown (gloo threads left to teardown
    # can abort a finished rank with SIGABRT).
    for rank in (0, 1):
        assert json.loads((tmp_path / f"rank{rank}-of-2-exit.json").read_text()) == {
            "group_alive": False
        }


@pytest.mark.slow
def test_dead_code_replacement_keeps_ranks_identical(tmp_path):
    run(tmp_path, 2, dead_code_every=2)
    rank0 = load_file(str(tmp_path / "rank0-of-2.safetensors"))
    rank1 = load_file(str(tmp_path / "rank1-of-2.safetensors"))
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name


def run_cli(audit: Path, out: Path, ranks: int, train_args: list[str]) -> None:
    """`tl-codebook train` through the worker (alone, or under torchrun with `ranks` ranks)."""
    audit.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    worker = [str(WORKER), "cli", str(audit), str(out), "--", *train_args]
    if ranks == 1:
        env.pop("WORLD_SIZE", None)
        command = [sys.executable, *worker]
    else:
        launch = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
        command = [sys.executable, *launch, *worker]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.slow
def test_cli_under_torchrun_rank_0_alone_writes_and_frozen_mode_matches_one_process(
    tmp_path, tiny_cfg
):
    model_json = tmp_path / "model.json"
    model_json.write_text(json.dumps(tiny_cfg.to_dict(), default=str))
    g = torch.Generator().manual_seed(0)
    rows = torch.randint(0, 11, (40, 16), generator=g).tolist()
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"tokens": r}) + "\n" for r in rows))
    train_args = ["--model", str(model_json), "--dataset", str(data), "--mode", "frozen"]
    train_args += ["--at", "hook_mlp_out", "--at", "attn.hook_z:group:layers=1", "--k", "2"]
    train_args += ["--num-codes", "8", "--steps", "6", "--batch-size", "4", "--seq-len", "8"]
    train_args += ["--lr", "3e-3", "--log-every", "2", "--checkpoint-every", "3", "--quiet"]

    run_cli(tmp_path / "audit-1", tmp_path / "one", 1, train_args)
    run_cli(tmp_path / "audit-2", tmp_path / "two", 2, train_args)
    rank0 = json.loads((tmp_path / "audit-2" / "rank0.json").read_text())
    rank1 = json.loads((tmp_path / "audit-2" / "rank1.json").read_text())
    assert rank1 == []
    written = {Path(path).name for _, path in rank0}
    assert {".lock", "metrics.jsonl", "state.json", "codebooks", "summary.json"} <= written
    for what in ("summary.json", "codebooks/codebooks.json", "checkpoints/step-00000006"):
        assert (tmp_path / "two" / what).exists(), what
    single = load_file(str(tmp_path / "one" / "codebooks" / "codebooks.safetensors"))
    double = load_file(str(tmp_path / "two" / "codebooks" / "codebooks.safetensors"))
    assert single.keys() == double.keys() and len(single) == 3
    for name in single:  # each rank's mean MSE on half the batch: the same mean gradient
        assert torch.allclose(single[name], double[name], atol=1e-5, rtol=1e-4), name
    one = json.loads((tmp_path / "one" / "summary.json").read_text())
    two = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert two["steps"] == one["steps"] == 6


@pytest.fixture
def second_rank_env(monkeypatch):
    """The environment torchrun gives the second of two ranks on one machine."""
    for name, value in {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}.items():
        monkeypatch.setenv(name, value)


def test_each_rank_gets_its_own_cuda_device(second_rank_env):
    assert dist_info_from_env() == DistInfo(rank=1, world_size=2, local_rank=1)
    assert not dist_info_from_env().is_main
    assert device_for_rank("cuda") == "cuda:1"
    assert device_for_rank("cuda:1") == "cuda:1"
    assert device_for_rank("cpu") == "cpu"
    with pytest.raises(
        ValueError, match=r"device 'cuda:0' under torchrun: rank 1 has LOCAL_RANK=1"
    ):
        device_for_rank("cuda:0")
    assert ddp_device_kwargs(torch.device("cuda", 1)) == {"device_ids": [1], "output_device": 1}
    assert ddp_device_kwargs(torch.device("cpu")) == {}
    # a model left on cuda:0 by the second rank is refused before any CUDA or NCCL call
    with pytest.raises(
        ValueError, match=r"LOCAL_RANK=1 trains on cuda:1, but the model is on cuda:0"
    ):
        init_distributed(torch.device("cuda", 0))


def test_alone_every_device_is_left_as_given(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert dist_info_from_env() == DistInfo()
    assert [device_for_rank(d) for d in (None, "cpu", "cuda:0")] == [None, "cpu", "cuda:0"]
