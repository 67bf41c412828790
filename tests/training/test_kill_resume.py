"""A real SIGKILL of `tl-codebook train` at a random step, then `--resume`, gives bit-identical
codebooks, model weights and metrics to a run that was never interrupted: dead-code replacement
on, and log, checkpoint and dead-code intervals that do not divide one another."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

STEPS = 60
FLAGS = [
    "--mode", "joint", "--at", "hook_mlp_out:layers=0", "--at", "attn.hook_z:group:layers=1",
    "--num-codes", "16", "--k", "2", "--steps", str(STEPS), "--batch-size", "2",
    "--seq-len", "8", "--lr", "3e-3", "--schedule", "cosine", "--warmup-steps", "7",
    "--log-every", "3", "--checkpoint-every", "5", "--dead-code-every", "4",
    "--device", "cpu", "--quiet",
]  # fmt: skip
UNTIMED = ("time", "tokens_per_second")


def command(model_json, data, out, *extra):
    cli = [sys.executable, "-m", "tl_codebook.cli", "train", "--model", str(model_json)]
    return [*cli, "--dataset", str(data), *FLAGS, "--out", str(out), *extra]


def environment():
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONHASHSEED": "0"}


def run_to_the_end(args):
    done = subprocess.run(args, env=environment(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def latest_step(out):
    pointer = out / "checkpoints" / "latest"
    try:
        return int(pointer.read_text().strip().removeprefix("step-"))
    except (OSError, ValueError):
        return 0


def metrics(out):
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in UNTIMED} for r in records]


@pytest.mark.slow
def test_sigkill_at_a_random_step_then_resume_is_bit_identical(tmp_path, tiny_cfg):
    model_json = tmp_path / "model.json"
    model_json.write_text(json.dumps(tiny_cfg.to_dict(), default=str))
    g = torch.Generator().manual_seed(0)
    documents = torch.randint(0, 11, (60, 30), generator=g).tolist()  # 225 rows of 8: 112 batches
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"tokens": d}) + "\n" for d in documents))

    whole, killed = tmp_path / "whole", tmp_path / "killed"
    run_to_the_end(command(model_json, data, whole))

    kill_after = random.Random().randrange(5, STEPS - 20)  # a checkpointed step, then run on
    process = subprocess.Popen(
        command(model_json, data, killed),
        env=environment(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 240
    while latest_step(killed) < kill_after and process.poll() is None:
        assert time.monotonic() < deadline, "the run made no progress"
        time.sleep(0.005)
    os.kill(process.pid, signal.SIGKILL)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == -signal.SIGKILL, stderr.decode()[-3000:]
    assert not (killed / "summary.json").exists(), f"finished before the kill at {kill_after}"
    interrupted_at = latest_step(killed)
    assert kill_after <= interrupted_at < STEPS

    run_to_the_end(command(model_json, data, killed, "--resume"))
    for name in ("codebooks.safetensors", "model.safetensors"):
        expected = load_file(str(whole / "codebooks" / name))
        resumed = load_file(str(killed / "codebooks" / name))
        assert expected.keys() == resumed.keys()
        for key in expected:
            assert torch.equal(expected[key], resumed[key]), (name, key, interrupted_at)
    assert metrics(killed) == metrics(whole), interrupted_at
    summary = json.loads((killed / "summary.json").read_text())
    assert summary == {
        **json.loads((whole / "summary.json").read_text()),
        "saved_to": summary["saved_to"],
    }
