"""The TokFSM experiment: config round trips, the loss floor, a partial report, and the `demo`
command end to end on a toy config."""

import argparse
import json
import math

import pytest
import torch

from tl_codebook.fsm import FSM, FSMConfig
from tl_codebook.fsm.cli import add_demo_command, config_from_args
from tl_codebook.fsm.experiment import ExperimentConfig, loss_floor, write_metrics
from tl_codebook.fsm.report import CONTRACT_KEYS, write_report


def demo_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    add_demo_command(parser)
    return parser


def test_config_round_trips_and_rejects_bad_values():
    config = ExperimentConfig.paper()
    assert ExperimentConfig.from_dict(config.to_dict()) == config
    assert json.loads(json.dumps(config.to_dict())) == config.to_dict()
    assert (config.n_states, config.n_edges, config.num_codes, config.codebook_steps) == (
        100,
        10,
        1000,
        20_000,
    )
    with pytest.raises(ValueError, match="did you mean 'num_codes'"):
        ExperimentConfig.from_dict({"num_code": 3})
    with pytest.raises(ValueError, match="valid sites: attn.hook_z, hook_mlp_out"):
        ExperimentConfig(codebook_sites=("hook_resid_post",))
    with pytest.raises(ValueError, match="codebook_init must be one of"):
        ExperimentConfig(codebook_init="zeros")


def test_cli_options_build_the_config():
    args = demo_parser().parse_args(
        ["--preset", "toy", "--set", "base_steps=7", "--set", "similarity=cosine"]
    )
    config = config_from_args(args)
    assert (config.base_steps, config.similarity, config.n_states) == (7, "cosine", 6)
    assert config_from_args(demo_parser().parse_args(["--paper-scale"])) == ExperimentConfig.paper()
    with pytest.raises(ValueError, match="did you mean base_steps"):
        config_from_args(demo_parser().parse_args(["--set", "base_step=3"]))
    bad = demo_parser().parse_args(["--set", "base_step=3"])
    assert bad.func(bad) == 2  # an error message, not a traceback


def test_loss_floor_known_answer():
    # 4 states in base 2 (2 digits), 2 edges; 9 tokens = BOS + 4 states: log 4 + 3 log 2 over 8
    fsm = FSM(
        FSMConfig(n_states=4, n_edges=2, base=2), torch.tensor([[1, 2], [2, 3], [3, 0], [0, 1]])
    )
    assert loss_floor(fsm, 9) == pytest.approx((math.log(4) + 3 * math.log(2)) / 8)
    # one more token: the first digit of a successor; successors' first digits: 0:{0,1} 1:{1,1}
    # 2:{0,1} 3:{0,0} -> entropies log2, 0, log2, 0 -> mean log(2)/2
    assert loss_floor(fsm, 10) == pytest.approx(
        (math.log(4) + 3 * math.log(2) + math.log(2) / 2) / 9
    )


def test_report_of_a_partial_run_is_viewable(tmp_path):
    write_metrics(
        tmp_path,
        {
            "config": ExperimentConfig.toy().to_dict(),
            "status": "running",
            "training": {"base": {"loss": [2.0, 1.5, 1.2, 1.1], "seconds": 1.0}},
            "loss_floor": 0.9,
            "seconds": float("nan"),
        },
    )
    page = write_report(tmp_path)
    text = page.read_text()
    assert "running" in text and "not yet measured" in text
    assert (tmp_path / "training_curves.png").stat().st_size > 0
    assert not (tmp_path / "interventions.png").exists()
    assert json.loads((tmp_path / "metrics.json").read_text())["seconds"] is None  # strict JSON


def test_demo_end_to_end_on_a_toy_config(tmp_path, capsys):
    out = tmp_path / "run"
    args = demo_parser().parse_args(["--preset", "toy", "--out", str(out), "--no-progress"])
    assert args.func(args) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["status"] == "done"
    for key in CONTRACT_KEYS:
        assert 0.0 <= metrics[key] <= 1.0, key
    for model in ("base", "codebook"):
        assert 0.0 <= metrics[model]["first_transition_accuracy_exact"] <= 1.0
        assert metrics[model]["next_token_loss"] > 0
    assert metrics["config"] == ExperimentConfig.toy().replace(progress=False).to_dict()
    assert metrics["seconds"] > 0
    for name in (
        "index.html",
        "fsm.json",
        "training_curves.png",
        "accuracy.png",
        "state_codes.png",
        "state_codes_per_site.png",
        "code_state_heatmap.png",
        "interventions.png",
        "base_model/model.safetensors",
        "codebook_model/codebooks.json",
        "codebook_model/model.safetensors",
    ):
        assert (out / name).is_file(), name
    html = (out / "index.html").read_text()
    assert all(f"{png}" in html for png in ("training_curves.png", "interventions.png"))
    assert "intervention_success" in capsys.readouterr().out
