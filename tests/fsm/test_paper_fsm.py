"""The paper-fsm preset (issue 14): the paper's machine and codebook sites, read back from the
config, the CLI and a shortened run's own files; and the reference's from-scratch route."""

import json
import math

import torch

from tl_codebook.cli import main
from tl_codebook.fsm import FSM
from tl_codebook.fsm.cli import config_from_args
from tl_codebook.fsm.config import PRESETS, ExperimentConfig
from tl_codebook.fsm.models import build_base_model, codebook_site_specs, starting_model

from .test_experiment import demo_parser, quick_toy

SHORTENED = {
    "base_steps": 150,
    "codebook_steps": 10,
    "codebook_init": "activations",
    "n_samples": 32,
    "n_held_out": 16,
    "n_intervention_prompts": 12,
    "checkpoint_every": 0,
    "threads": 1,
}
"""The preset cut to a shortened run: every phase, the paper's machine and sites and the preset's
codes, few steps; codes start as activations (k-means over 20 codebooks of 1536 codes is most of a
short run's time); one thread (the suite runs two workers on two cores)."""


def assert_papers_machine_and_sites(config: dict) -> None:
    assert (config["n_states"], config["n_edges"], config["base"]) == (100, 10, 10)
    assert list(config["codebook_sites"]) == ["attn.hook_z", "hook_mlp_out"]
    assert (config["k"], config["similarity"], config["n_layers"]) == (1, "inner_product", 4)
    assert config["codebook_route"] == "fine-tune"


def test_the_preset_is_the_papers_fsm_and_sites():
    config = PRESETS["paper-fsm"]()
    assert config == ExperimentConfig.paper_fsm()
    assert_papers_machine_and_sites(config.to_dict())
    assert ExperimentConfig.from_dict(config.to_dict()) == config
    assert config_from_args(demo_parser().parse_args(["--preset", "paper-fsm"])) == config
    fsm = FSM.generate(config.fsm_config())
    assert fsm.digits_per_state == 2 and fsm.vocab_size == 11  # 10 digits + BOS
    successors = fsm.transitions
    assert successors.shape == (100, 10)
    assert all(len(set(row)) == 10 for row in successors.tolist())  # distinct out-edges
    # every layer: one codebook on attn.hook_z with one group per head, one on hook_mlp_out
    specs = codebook_site_specs(config)
    assert [(s.at, s.group) for s in specs] == [
        (f"blocks.{layer}.{site}", site == "attn.hook_z")
        for layer in range(4)
        for site in ("attn.hook_z", "hook_mlp_out")
    ]


def test_a_shortened_run_of_the_preset_end_to_end(tmp_path):
    out = tmp_path / "run"
    argv = ["demo", "--preset", "paper-fsm", "--out", str(out), "--no-progress"]
    for key, value in SHORTENED.items():
        argv += ["--set", f"{key}={value}"]
    assert main(argv) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["status"] == "done"
    assert_papers_machine_and_sites(metrics["config"])
    expected = ExperimentConfig.paper_fsm().replace(**SHORTENED, progress=False)
    assert metrics["config"] == expected.to_dict()
    assert metrics["digits_per_state"] == 2
    fsm = FSM.load(out / "fsm.json")
    assert torch.equal(fsm.transitions, FSM.generate(expected.fsm_config()).transitions)
    # sequences are BOS + digits: the held-out code cache holds 16 x 32 tokens, BOS first
    assert metrics["analysis"]["n_tokens"] == 16 * 32
    # 150 steps learn the digits' statistics: below a uniform guess over the 10 digits
    assert metrics["base"]["next_token_loss"] < 2.35 < math.log(10.5)  # measured 2.27
    for condition in ("steer", "steer_best_site", "random_code", "none"):
        js = metrics["interventions"][condition]["js_divergence"]
        assert 0.0 <= js <= 1.0
    # unsteered, the next state follows s, whose successors are rarely s′'s: JS far from 0
    assert metrics["interventions"]["none"]["js_divergence"] > 0.5


def test_the_scratch_route_starts_from_the_initial_weights_not_the_trained_base():
    config = quick_toy(codebook_route="scratch")
    fsm = FSM.generate(config.fsm_config())
    fresh = build_base_model(config, fsm, "cpu")
    trained = build_base_model(config, fsm, "cpu")
    with torch.no_grad():
        trained.W_E.add_(1.0)  # stands for training
    start = starting_model(config, trained, fsm)
    assert torch.equal(start.W_E, fresh.W_E) and not torch.equal(start.W_E, trained.W_E)
    ours = starting_model(config.replace(codebook_route="fine-tune"), trained, fsm)
    assert torch.equal(ours.W_E, trained.W_E) and ours is not trained


def test_the_scratch_route_runs_end_to_end_from_an_untrained_model(tmp_path):
    from tl_codebook.fsm.experiment import run_experiment

    config = quick_toy(codebook_route="scratch", base_steps=200)
    metrics = run_experiment(config, tmp_path / "r", log=lambda _: None)
    assert metrics["status"] == "done" and metrics["config"]["codebook_route"] == "scratch"
    # phase 2 starts from random weights: before training, its loss is far above the base's
    start = metrics["codebook"]["next_token_loss_before_fine_tuning"]
    assert start > metrics["base"]["next_token_loss"] + 0.3
