import json
import os
import random
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from tl_codebook.training.checkpoint import (
    CheckpointError,
    DamagedCheckpointWarning,
    ensure_writable,
    list_checkpoints,
    load_checkpoint,
    load_latest_checkpoint,
    optimizer_state_from_checkpoint,
    optimizer_state_to_checkpoint,
    restore_rng_state,
    rng_state_to_checkpoint,
    save_checkpoint,
)
from tl_codebook.training.metrics_log import MetricsLogger, read_metrics


def test_save_then_load_round_trips(tmp_path):
    tensors = {"codes": torch.randn(2, 5, 3), "ids": torch.arange(4), "empty": torch.zeros(0)}
    state = {"lr": 0.1, "name": "run", "nested": {"a": [1, 2]}}
    path = save_checkpoint(tmp_path, 7, tensors, state)
    assert path == tmp_path / "step-00000007"
    assert sorted(p.name for p in path.iterdir()) == ["state.json", "tensors.safetensors"]
    assert (tmp_path / "latest").read_text() == "step-00000007\n"
    step, loaded, loaded_state = load_latest_checkpoint(tmp_path)
    assert step == 7 and loaded_state == state
    assert loaded.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert torch.equal(loaded[name], tensor)


def test_no_checkpoint_yet_gives_none(tmp_path):
    assert load_latest_checkpoint(tmp_path) is None
    assert load_latest_checkpoint(tmp_path / "missing") is None


def test_keep_last_prunes_older_steps(tmp_path):
    for step in (1, 2, 3, 10, 20):
        save_checkpoint(tmp_path, step, {"x": torch.tensor([step])}, {}, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000010", "step-00000020"]


def test_pointer_decides_over_higher_numbered_leftovers(tmp_path):
    save_checkpoint(tmp_path, 30, {"x": torch.tensor([30])}, {})
    save_checkpoint(tmp_path, 12, {"x": torch.tensor([12])}, {})  # a run resumed from earlier
    assert load_latest_checkpoint(tmp_path).step == 12


def test_resaving_a_step_replaces_it(tmp_path):
    save_checkpoint(tmp_path, 5, {"x": torch.tensor([1])}, {"v": 1})
    save_checkpoint(tmp_path, 5, {"x": torch.tensor([2])}, {"v": 2})
    step, tensors, state = load_latest_checkpoint(tmp_path)
    assert (step, tensors["x"].item(), state) == (5, 2, {"v": 2})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-00000005"]


def test_leftover_temporaries_are_ignored_then_cleaned(tmp_path):
    save_checkpoint(tmp_path, 1, {"x": torch.tensor([1])}, {})
    half = tmp_path / ".tmp-step-00000002-999-abc"
    half.mkdir()
    (half / "tensors.safetensors").write_bytes(b"\x00\x01")
    (tmp_path / ".tmp-latest-999-abc").write_text("step-00000002\n")
    assert load_latest_checkpoint(tmp_path).step == 1
    save_checkpoint(tmp_path, 3, {"x": torch.tensor([3])}, {})
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "latest",
        "step-00000001",
        "step-00000003",
    ]


def test_missing_pointer_target_falls_back_to_highest_complete_step(tmp_path):
    save_checkpoint(tmp_path, 1, {"x": torch.tensor([1])}, {})
    save_checkpoint(tmp_path, 2, {"x": torch.tensor([2])}, {})
    (tmp_path / "latest").write_text("step-00000009\n")
    assert load_latest_checkpoint(tmp_path).step == 2


def test_corrupt_checkpoint_raises_naming_it(tmp_path):
    path = save_checkpoint(tmp_path, 4, {"x": torch.tensor([4])}, {})
    (path / "tensors.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="step-00000004"):
        load_latest_checkpoint(tmp_path)


@pytest.mark.parametrize("damage", ["tensors.safetensors", "state.json"])
def test_damaged_latest_checkpoint_falls_back_to_the_previous_complete_one(tmp_path, damage):
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, {"x": torch.tensor([step])}, {"v": step})
    damaged = tmp_path / "step-00000003" / damage
    damaged.write_bytes(damaged.read_bytes()[: len(damaged.read_bytes()) // 2])  # truncated
    with pytest.warns(DamagedCheckpointWarning, match=r"step-00000003.*step-00000002"):
        step, tensors, state = load_latest_checkpoint(tmp_path)
    assert (step, tensors["x"].item(), state) == (2, 2, {"v": 2})


def test_fallback_goes_to_steps_before_the_pointer_not_later_leftovers(tmp_path):
    for step in (10, 30, 12):  # resumed from step 10: step 30 belongs to the abandoned run
        save_checkpoint(tmp_path, step, {"x": torch.tensor([step])}, {})
    (tmp_path / "step-00000012" / "state.json").write_text("{")
    with pytest.warns(DamagedCheckpointWarning, match="step-00000012"):
        assert load_latest_checkpoint(tmp_path).step == 10


@pytest.mark.parametrize("failing_call", [1, 2, 3])
def test_failure_at_any_rename_keeps_the_previous_checkpoint(tmp_path, monkeypatch, failing_call):
    save_checkpoint(tmp_path, 1, {"x": torch.tensor([1])}, {"v": 1})
    save_checkpoint(tmp_path, 2, {"x": torch.tensor([2])}, {"v": 2})
    calls = []
    real_rename, real_replace = os.rename, os.replace

    def crash_on_nth(real):
        def wrapped(*args, **kwargs):
            calls.append(args)
            if len(calls) == failing_call:
                raise OSError("simulated crash")
            return real(*args, **kwargs)

        return wrapped

    monkeypatch.setattr(os, "rename", crash_on_nth(real_rename))
    monkeypatch.setattr(os, "replace", crash_on_nth(real_replace))
    # Re-saving step 2 renames the old dir away, the new one in, then replaces the pointer.
    with pytest.raises(OSError, match="simulated crash"):
        save_checkpoint(tmp_path, 2, {"x": torch.tensor([20])}, {"v": 20})
    step, tensors, state = load_latest_checkpoint(tmp_path)
    assert (step, tensors["x"].item(), state["v"]) in {(2, 2, 2), (2, 20, 20), (1, 1, 1)}


def test_files_and_directories_are_fsynced(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync

    def recording_fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    save_checkpoint(tmp_path, 3, {"x": torch.tensor([3])}, {})
    names = [Path(p).name for p in synced]
    assert "tensors.safetensors" in names and "state.json" in names
    assert str(tmp_path) in synced  # the rename of the step directory and of the pointer
    assert any(name.startswith(".tmp-latest") for name in names)


def test_ensure_writable_names_the_bad_path(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(CheckpointError, match=r"a_file/checkpoints.*is not writable"):
        ensure_writable(blocker / "checkpoints")
    assert ensure_writable(tmp_path / "new" / "dir").is_dir()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"step": -1}, "step must be an int >= 0, got -1"), ({"keep_last": 0}, "keep_last must")],
)
def test_bad_arguments_raise(tmp_path, kwargs, message):
    options = {"step": 1, "tensors": {}, "state": {}, **kwargs}
    with pytest.raises(ValueError, match=message):
        save_checkpoint(tmp_path, **options)


def test_tied_tensors_are_saved(tmp_path):
    weight = torch.randn(3, 3)
    save_checkpoint(tmp_path, 1, {"embed": weight, "unembed": weight, "row": weight[0]}, {})
    loaded = load_latest_checkpoint(tmp_path).tensors
    assert torch.equal(loaded["unembed"], weight) and torch.equal(loaded["row"], weight[0])


def test_optimizer_state_round_trips_through_a_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.8, 0.95))
    for _ in range(3):
        optimizer.zero_grad()
        model(torch.randn(4, 3)).square().sum().backward()
        optimizer.step()
    tensors, state = optimizer_state_to_checkpoint(optimizer.state_dict())
    assert set(tensors) == {
        f"optim.state.{i}.{n}" for i in (0, 1) for n in ("step", "exp_avg", "exp_avg_sq")
    }
    save_checkpoint(tmp_path, 3, tensors, {"optim": state})
    _, loaded_tensors, loaded_state = load_latest_checkpoint(tmp_path)

    fresh_model = torch.nn.Linear(3, 2)
    fresh_model.load_state_dict(model.state_dict())
    fresh = torch.optim.AdamW(fresh_model.parameters(), lr=1.0)
    fresh.load_state_dict(optimizer_state_from_checkpoint(loaded_tensors, loaded_state["optim"]))
    assert fresh.param_groups[0]["betas"] == (0.8, 0.95)
    assert fresh.param_groups[0]["lr"] == 1e-2
    batch = torch.randn(4, 3)
    for m, opt in ((model, optimizer), (fresh_model, fresh)):
        opt.zero_grad()
        m(batch).square().sum().backward()
        opt.step()
    for a, b in zip(model.parameters(), fresh_model.parameters()):
        assert torch.equal(a, b)


def test_rng_state_round_trips_through_a_checkpoint(tmp_path):
    generator = torch.Generator().manual_seed(5)
    tensors, state = rng_state_to_checkpoint({"dead_codes": generator})
    assert all(t.dtype == torch.uint8 for t in tensors.values())
    save_checkpoint(tmp_path, 1, tensors, {"rng": state})

    def draw():
        return (
            torch.rand(3).tolist(),
            random.random(),
            np.random.rand(),
            torch.rand(2, generator=generator).tolist(),
        )

    expected = draw()
    draw()  # move every RNG on
    _, loaded_tensors, loaded_state = load_latest_checkpoint(tmp_path)
    restore_rng_state(loaded_tensors, loaded_state["rng"], {"dead_codes": generator})
    assert draw() == expected
    with pytest.raises(CheckpointError, match="no saved state for generator 'other'"):
        restore_rng_state(loaded_tensors, loaded_state["rng"], {"other": torch.Generator()})


def write_checkpoints_forever(directory: Path, step: int) -> None:
    """Save step, step + 1, ... with contents derived from the step, until killed."""
    while True:
        weights = torch.from_numpy(np.full((256, 1024), step, dtype=np.float32))
        ids = torch.from_numpy(np.arange(step, step + 999))
        save_checkpoint(
            directory,
            step,
            {"weights": weights, "ids": ids},
            {"step_copy": step, "pad": "x" * 5000},
            keep_last=2,
        )
        step += 1


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_writer_killed_at_random_moments_leaves_a_complete_checkpoint(tmp_path):
    # A forked writer starts at once (torch already imported) and is SIGKILLed mid-loop, so
    # it gets no chance to clean up; every time, the latest checkpoint must be whole.
    directory = tmp_path / "checkpoints"
    rng = random.Random(0)
    step, found = 0, 0
    for _ in range(6):
        pid = os.fork()
        if pid == 0:
            try:
                write_checkpoints_forever(directory, step)
            finally:
                os._exit(1)
        time.sleep(rng.uniform(0.02, 0.3))
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        latest = load_latest_checkpoint(directory)
        if latest is None:
            continue
        found += 1
        assert latest.state["step_copy"] == latest.step
        assert torch.equal(latest.tensors["weights"], torch.full((256, 1024), float(latest.step)))
        assert torch.equal(latest.tensors["ids"], torch.arange(latest.step, latest.step + 999))
        for path in list_checkpoints(directory):
            load_checkpoint(path)  # every visible step directory is complete
        step = latest.step  # resume: the next writer re-saves this step first
    assert found > 0


def test_metrics_logger_writes_one_json_object_per_line(tmp_path):
    with MetricsLogger(tmp_path) as logger:
        logger.log(1, {"loss": torch.tensor(2.5), "lr": np.float32(0.5), "note": "warmup"})
        logger.log(2, {"loss": float("nan")})
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [(r["step"], r["loss"]) for r in records] == [(1, 2.5), (2, None)]
    assert records[0]["lr"] == 0.5 and records[0]["note"] == "warmup"


def test_metrics_logger_resume_drops_later_steps_and_torn_lines(tmp_path):
    path = tmp_path / "run" / "log.jsonl"
    with MetricsLogger(path) as logger:
        for step in range(1, 6):
            logger.log(step, {"loss": float(step)})
    with open(path, "a") as file:
        file.write('{"step": 6, "lo')  # a writer killed mid-line
    with MetricsLogger(path, resume_step=3) as logger:
        logger.log(4, {"loss": 40.0})
    assert [(r["step"], r["loss"]) for r in read_metrics(path)] == [
        (1, 1.0),
        (2, 2.0),
        (3, 3.0),
        (4, 40.0),
    ]
    with MetricsLogger(path):  # a fresh run starts empty
        pass
    assert read_metrics(path) == []


def test_metrics_logger_rejects_bad_values(tmp_path):
    with MetricsLogger(tmp_path) as logger:
        with pytest.raises(ValueError, match="metric 'codes' must be a scalar"):
            logger.log(1, {"codes": torch.zeros(3)})
        with pytest.raises(TypeError, match="metric 'cfg' is a dict"):
            logger.log(1, {"cfg": {}})
        with pytest.raises(ValueError, match="metric name 'step' is reserved"):
            logger.log(1, {"step": 3})
