"""`tl-codebook circuits` end to end on the quick tasks: circuits.json's contract, the report,
a finished run refused, bad input named."""

from __future__ import annotations

import json

import pytest

from tl_codebook.cli import main
from tl_codebook.comparisons.circuits.methods import METHODS

QUICK = ["--tasks", "one_head", "--prompts", "8", "--examples", "4", "8"]
QUICK += ["--scaling-heads", "1", "2"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("circuits")
    assert main(["circuits", "--out", str(out), *QUICK]) == 0
    return out


def test_circuits_json_has_a_row_per_task_and_method(run_dir) -> None:
    data = json.loads((run_dir / "circuits.json").read_text())
    assert data["finished"] is True
    rows = data["rows"]
    assert sorted({(r["task"], r["method"]) for r in rows}) == sorted(
        ("one_head", m) for m in METHODS
    )
    for row in rows:
        for key in ("task", "method", "node_auroc", "edge_auroc", "cpr", "cmd", "seconds"):
            assert key in row
        assert row["n_examples"] == 8
        assert (row["edge_auroc"] is None) == (row["method"] == "attribution_patching")
        assert 0.0 <= row["cpr"] <= 1.0 and row["cmd"] >= 0.0
    exact = {r["task"]: r for r in rows if r["method"] == "activation_patching"}
    assert exact["one_head"]["node_auroc"] == 1.0
    counts = {(r["method"], r["n_examples"]) for r in data["examples"]}
    assert counts == {(m, n) for m in METHODS for n in (4, 8)}
    assert {r["heads"] for r in data["scaling"]} == {2, 4}


def test_report_and_plots_are_written(run_dir) -> None:
    page = (run_dir / "index.html").read_text()
    for name in ("roc.png", "faithfulness.png", "scaling.png", "examples.png"):
        assert (run_dir / name).stat().st_size > 1000
        assert name in page
    assert "cannot see" in page and "random" in page


def test_a_finished_run_is_refused_and_bad_names_are_listed(run_dir, capsys) -> None:
    assert main(["circuits", "--out", str(run_dir), *QUICK]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["circuits", "--out", str(run_dir / "x"), "--methods", "magic"]) == 2
    err = capsys.readouterr().err
    assert "magic" in err and "eap_ig" in err and "acdc" in err
    assert main(["circuits", "--out", str(run_dir / "y"), "--tasks", "ioi"]) == 2
    assert "induction" in capsys.readouterr().err
