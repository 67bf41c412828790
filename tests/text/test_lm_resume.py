"""A real SIGKILL of `tl-codebook demo --task lm` after its codebooks are trained (jointly, the
paper's method), then `--resume`: nothing that finished is redone or lost, and the resumed run
measures the same language-model loss with its codebooks as the killed one did, which holds only
if the fine-tuned model weights came back with the codebooks."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tl_codebook.cli import main

ARGS = [
    "demo", "--task", "lm", "--preset", "toy", "--no-progress",
    "--set", "mode=joint", "--set", "topics=sports,tech", "--set", "prompts_per_topic=1",
]  # fmt: skip


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def recorded(out):
    try:
        return json.loads((out / "metrics.json").read_text())
    except (OSError, ValueError):  # not written yet
        return {}


@pytest.mark.slow
def test_joint_run_killed_after_phase_three_resumes_without_redoing_or_losing_work(
    tmp_path, capsys
):
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "tl_codebook.cli", *ARGS, "--out", str(out)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 300
    while recorded(out).get("lm") is None and process.poll() is None:
        assert time.monotonic() < deadline, "the run made no progress"
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == -signal.SIGKILL, stderr.decode()[-3000:]

    killed = recorded(out)
    assert killed["status"] == "running" and killed["steering_success"] is None
    assert killed["training"]["done"] and killed["config"]["mode"] == "joint"
    weights = out / "codebooks" / "model.safetensors"  # joint: the fine-tuned model is saved
    saved = {p.name: digest(p) for p in (out / "codebooks").iterdir()}
    assert weights.name in saved

    assert main([*ARGS, "--out", str(out)]) == 2  # an unfinished run is not overwritten
    assert "already holds a run (status 'running')" in capsys.readouterr().err
    assert main(["demo", "--task", "lm", "--out", str(out), "--resume"]) == 0  # its own config
    assert "2/7 codebooks: finished before, loaded" in capsys.readouterr().out

    resumed = recorded(out)
    assert resumed["status"] == "done"
    assert {p.name: digest(p) for p in (out / "codebooks").iterdir()} == saved
    assert resumed["phases"]["train"] == killed["phases"]["train"]
    assert resumed["training"] == killed["training"]
    # the base model is reloaded from the wheel, the trained one from codebooks/: the same losses
    assert resumed["base_loss"] == pytest.approx(killed["base_loss"], abs=1e-5)
    for key in ("codebook_loss", "zero_ablated_loss"):
        assert resumed["lm"][key] == pytest.approx(killed["lm"][key], abs=1e-5), key
    assert resumed["seconds"] > killed["seconds"]
    assert 0.0 <= resumed["steering_success"] <= 1.0
