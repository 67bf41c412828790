"""`tl-codebook train` never destroys or mixes runs: the run directory's lock, --overwrite, the
refusals of --resume, the data's identity, damaged checkpoints and the atomic codebooks/."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tl_codebook import HookedCodebookTransformer
from tl_codebook.cli import main
from tl_codebook.files import RunDirLockedError, locked_run_dir
from tl_codebook.training import TrainConfig, train_codebooks
from tl_codebook.training.checkpoint import DamagedCheckpointWarning


@pytest.fixture
def inputs(tmp_path, tiny_cfg):
    """The tiny model as a config JSON, and 40 rows of 16 tokens as a local .jsonl file."""
    model_json = tmp_path / "model.json"
    model_json.write_text(json.dumps(tiny_cfg.to_dict(), default=str))
    data = tmp_path / "data.jsonl"
    write_rows(data, seed=0)
    return model_json, data


def write_rows(path, seed):
    g = torch.Generator().manual_seed(seed)
    rows = torch.randint(0, 11, (40, 16), generator=g).tolist()
    path.write_text("".join(json.dumps({"tokens": r}) + "\n" for r in rows))


def train(inputs, out, *extra, data=None):
    model_json, default_data = inputs
    argv = ["train", "--model", str(model_json), "--dataset", str(data or default_data)]
    argv += ["--mode", "frozen", "--at", "hook_mlp_out:layers=1", "--num-codes", "8"]
    argv += ["--steps", "4", "--batch-size", "2", "--seq-len", "8", "--log-every", "1"]
    argv += ["--checkpoint-every", "2", "--out", str(out), "--quiet", *extra]
    return main(argv)  # later flags win over the defaults above


def snapshot(directory):
    """Every file under `directory` (the lock file apart) and its bytes."""
    return {
        str(p.relative_to(directory)): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }


def error_line(capsys):
    err = capsys.readouterr().err
    assert err.startswith("tl-codebook train: error: ") and err.count("\n") == 1, err
    return err


def test_fresh_run_over_results_is_refused_unless_overwrite(tmp_path, inputs, capsys):
    out = tmp_path / "run"
    assert train(inputs, out) == 0
    before = snapshot(out)
    assert train(inputs, out, "--steps", "3", "--checkpoint-every", "3") == 2
    err = error_line(capsys)
    assert "already holds the results of a run (summary.json, metrics.jsonl, checkpoints" in err
    assert "--overwrite" in err
    assert snapshot(out) == before  # nothing cut, nothing mixed
    assert train(inputs, out, "--resume", "--overwrite") == 2
    assert "--resume continues the run in --out and --overwrite replaces it" in error_line(capsys)
    assert train(inputs, out, "--steps", "3", "--checkpoint-every", "3", "--overwrite") == 0
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step-00000003"]
    assert [r["step"] for r in map(json.loads, (out / "metrics.jsonl").open())] == [1, 2, 3]
    assert json.loads((out / "summary.json").read_text())["steps"] == 3


def test_resume_of_a_run_without_checkpoints_keeps_its_results(tmp_path, inputs, capsys):
    out = tmp_path / "run"
    assert train(inputs, out, "--checkpoint-every", "0") == 0
    before = snapshot(out)
    assert {"summary.json", "metrics.jsonl", "codebooks/codebooks.json"} <= set(before)
    capsys.readouterr()
    assert train(inputs, out, "--checkpoint-every", "0", "--resume") == 2
    assert "cannot resume in" in error_line(capsys)
    assert snapshot(out) == before


def test_resume_on_other_data_is_refused(tmp_path, inputs, capsys):
    out = tmp_path / "run"
    assert train(inputs, out) == 0
    before = snapshot(out)
    other = tmp_path / "other.jsonl"
    write_rows(other, seed=1)
    capsys.readouterr()
    assert train(inputs, out, "--resume", "--steps", "6", data=other) == 2
    assert "cannot resume on other data" in error_line(capsys)
    write_rows(inputs[1], seed=1)  # the same file name, other contents
    assert train(inputs, out, "--resume", "--steps", "6") == 2
    assert "cannot resume on other data" in error_line(capsys)
    assert snapshot(out) == before


def test_api_resume_on_other_batches_is_refused(tmp_path, tiny_cfg):
    def batches(seed):
        g = torch.Generator().manual_seed(seed)
        return [torch.randint(0, 11, (2, 8), generator=g) for _ in range(8)]

    def config(steps):
        return TrainConfig(
            mode="frozen",
            sites=["hook_mlp_out:layers=1"],
            num_codes=8,
            steps=steps,
            checkpoint_every=2,
            out_dir=str(tmp_path),
            progress=False,
        )

    train_codebooks(HookedCodebookTransformer(tiny_cfg), batches(0), config(2))
    with pytest.raises(ValueError, match="cannot resume on other data: the first batch differs"):
        train_codebooks(HookedCodebookTransformer(tiny_cfg), batches(1), config(4), resume=True)
    # a data_id given by the caller is recorded and checked too
    train_codebooks(HookedCodebookTransformer(tiny_cfg), batches(0), config(2), data_id="corpus-a")
    with pytest.raises(ValueError, match="trained on 'corpus-a', this run reads 'corpus-b'"):
        train_codebooks(
            HookedCodebookTransformer(tiny_cfg), batches(0), config(4), True, data_id="corpus-b"
        )


def test_resume_with_fewer_steps_than_the_checkpoint_is_an_error(tmp_path, inputs, capsys):
    out = tmp_path / "run"
    assert train(inputs, out) == 0
    before = snapshot(out)
    capsys.readouterr()
    assert train(inputs, out, "--resume", "--steps", "2") == 2
    assert "steps=2 is below the checkpoint's step 4" in error_line(capsys)
    assert snapshot(out) == before


def test_summary_is_strict_json_when_no_step_is_left(tmp_path, inputs):
    out = tmp_path / "run"
    assert train(inputs, out) == 0
    assert train(inputs, out, "--resume") == 0  # already at step 4: no loss to report

    def refuse(constant):
        raise AssertionError(f"{constant} in summary.json")

    summary = json.loads((out / "summary.json").read_text(), parse_constant=refuse)
    assert summary["steps"] == 4 and summary["final_loss"] is None


HOLD_LOCK = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
print("locked", flush=True)
time.sleep(120)
"""


def test_a_run_dir_in_use_by_another_process_fails_at_once(tmp_path, inputs, capsys):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen(  # another process holding --out's lock, as a running train does
        [sys.executable, "-c", HOLD_LOCK, str(out / ".lock")], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline() == "locked\n"
        assert train(inputs, out) == 2
    finally:
        holder.kill()
        holder.wait()
    assert "is in use by another process" in error_line(capsys)
    assert snapshot(out) == {}


def test_the_python_api_takes_the_run_dirs_lock_too(tmp_path, tiny_cfg):
    out = tmp_path / "run"
    out.mkdir()
    config = TrainConfig(
        mode="frozen", sites=["hook_mlp_out:layers=1"], num_codes=8, steps=2,
        out_dir=str(out), progress=False,
    )  # fmt: skip
    tokens = torch.randint(0, 11, (2, 8), generator=torch.Generator().manual_seed(0))
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(out / ".lock")], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline() == "locked\n"
        with pytest.raises(RunDirLockedError, match="in use by another process"):
            train_codebooks(HookedCodebookTransformer(tiny_cfg), iter([tokens] * 4), config)
    finally:
        holder.kill()
        holder.wait()
    assert snapshot(out) == {}
    with locked_run_dir(out):  # re-entrant in one process: the CLI holds it around the trainer
        result = train_codebooks(HookedCodebookTransformer(tiny_cfg), iter([tokens] * 4), config)
    assert result.steps == 2


def test_damaged_latest_checkpoint_resumes_from_the_previous_one(tmp_path, inputs, capsys):
    uninterrupted, out = tmp_path / "whole", tmp_path / "run"
    assert train(inputs, uninterrupted, "--steps", "6") == 0
    assert train(inputs, out) == 0  # checkpoints at steps 2 and 4
    weights = out / "checkpoints" / "step-00000004" / "tensors.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    with pytest.warns(DamagedCheckpointWarning, match=r"step-00000004.*step-00000002"):
        assert train(inputs, out, "--resume", "--steps", "6") == 0
    assert_same_codebooks(uninterrupted, out)
    assert [r["step"] for r in map(json.loads, (out / "metrics.jsonl").open())] == [*range(1, 7)]


def test_final_codebooks_are_replaced_whole(tmp_path, inputs, capsys, monkeypatch):
    out = tmp_path / "run"
    assert train(inputs, out) == 0
    before = snapshot(out / "codebooks")

    def fail_half_way(model, path, **kwargs):
        (path / "codebooks.safetensors").write_bytes(b"half")
        raise OSError("No space left on device")

    monkeypatch.setattr(HookedCodebookTransformer, "save_codebooks", fail_half_way)
    assert train(inputs, out, "--resume", "--steps", "6") == 2
    assert "No space left on device" in error_line(capsys)
    assert snapshot(out / "codebooks") == before
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".tmp")) == []


def assert_same_codebooks(a, b):
    saved_a = load_file(str(a / "codebooks" / "codebooks.safetensors"))
    saved_b = load_file(str(b / "codebooks" / "codebooks.safetensors"))
    assert saved_a.keys() == saved_b.keys()
    for name in saved_a:
        assert torch.equal(saved_a[name], saved_b[name]), name
