"""files.py: the one atomic write, strict JSON, safe names and the run-directory lock."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from tl_codebook.files import (
    TEMP_PREFIX,
    RunDirLockedError,
    atomic_directory,
    atomic_write_json,
    atomic_write_text,
    check_safe_name,
    json_ready,
    locked_run_dir,
    remove_leftovers,
)


def test_json_ready_makes_strict_json_of_tensors_numpy_and_non_finite_floats():
    data = {
        "t": torch.tensor([1.5, float("nan")]),
        "s": torch.tensor(3),
        "n": np.float32(0.25),
        "i": np.int64(7),
        "inf": float("inf"),
        "tup": (1, 2.0),
        1: True,
        "none": None,
    }
    assert json_ready(data) == {
        "t": [1.5, None],
        "s": 3,
        "n": 0.25,
        "i": 7,
        "inf": None,
        "tup": [1, 2.0],
        "1": True,
        "none": None,
    }
    assert json_ready(math.pi, digits=3) == 3.142
    with pytest.raises(TypeError, match="object"):
        json_ready(object())


def test_atomic_write_json_writes_null_for_nan_and_leaves_no_temporary(tmp_path):
    path = atomic_write_json(tmp_path / "sub" / "m.json", {"loss": float("nan"), "x": 1.0})
    assert json.loads(path.read_text()) == {"loss": None, "x": 1.0}
    assert "NaN" not in path.read_text()
    assert sorted(p.name for p in path.parent.iterdir()) == ["m.json"]


def test_a_failed_write_keeps_the_old_file(tmp_path):
    path = atomic_write_text(tmp_path / "a.json", "old")
    with pytest.raises(TypeError):
        atomic_write_json(path, {"bad": object()})
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


def test_atomic_directory_swaps_in_whole_or_not_at_all(tmp_path):
    target = tmp_path / "codebooks"
    with atomic_directory(target) as temp:
        (temp / "a.txt").write_text("1")
    assert (target / "a.txt").read_text() == "1"
    with pytest.raises(RuntimeError):
        with atomic_directory(target) as temp:
            (temp / "b.txt").write_text("2")
            raise RuntimeError("killed")
    assert sorted(p.name for p in target.iterdir()) == ["a.txt"]
    with atomic_directory(target) as temp:
        (temp / "c.txt").write_text("3")
    assert sorted(p.name for p in target.iterdir()) == ["c.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["codebooks"]


def test_remove_leftovers_removes_only_temporary_names(tmp_path):
    (tmp_path / f"{TEMP_PREFIX}x").mkdir()
    (tmp_path / f"{TEMP_PREFIX}y").write_text("")
    (tmp_path / "keep").write_text("")
    remove_leftovers(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["keep"]


@pytest.mark.parametrize("name", ["k1", "topk-4", "a.b_c"])
def test_safe_names_pass(name):
    assert check_safe_name(name) == name


@pytest.mark.parametrize("name", ["../x", "a/b", "", ".", "..", "a b", "x\x00", "name\n"])
def test_unsafe_names_are_refused_with_the_name(name):
    with pytest.raises(ValueError, match="method name"):
        check_safe_name(name, "method name")


def test_run_dir_lock_is_re_entrant_in_one_process_and_released(tmp_path):
    run = tmp_path / "run"
    with locked_run_dir(run):
        with locked_run_dir(tmp_path / "." / "run"):  # the same directory, nested: passes
            pass
        assert _held_elsewhere(run)  # still held after the nested block left
    assert not _held_elsewhere(run)  # released on exit


def _held_elsewhere(run) -> bool:
    """Whether another process finds `run/.lock` locked (plain flock: no package import)."""
    probe = subprocess.run(
        [
            sys.executable,
            "-c",
            "import fcntl, os, sys\n"
            f"fd = os.open({str(run / '.lock')!r}, os.O_RDWR)\n"
            "try:\n    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)\n"
            "except BlockingIOError:\n    sys.exit(3)",
        ],
        check=False,
    )
    return probe.returncode == 3


def test_run_dir_lock_is_released_when_its_holder_is_killed(tmp_path):
    run = tmp_path / "run"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from tl_codebook.files import locked_run_dir\n"
            f"with locked_run_dir({str(run)!r}):\n    print('held', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(RunDirLockedError):
            with locked_run_dir(run):
                pass
    finally:
        holder.kill()
        holder.wait()
    with locked_run_dir(run):
        assert os.path.exists(run / ".lock")
