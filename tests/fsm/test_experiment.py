"""The TokFSM experiment: config round trips, the loss floor, a partial report, the `demo`
command end to end on the toy preset (it must learn its FSM and steer), seeds, and resuming."""

import argparse
import json
import math
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from tl_codebook.analysis.cache import CodeCache
from tl_codebook.cli import main
from tl_codebook.fsm import FSM, FSMConfig, TokFSMDataset
from tl_codebook.fsm.cli import add_demo_command, config_from_args
from tl_codebook.fsm.config import ExperimentConfig
from tl_codebook.fsm.evaluation import loss_floor
from tl_codebook.fsm.experiment import run_experiment
from tl_codebook.fsm.metrics import next_token_loss
from tl_codebook.fsm.metrics_file import CONTRACT_KEYS, write_metrics
from tl_codebook.fsm.models import base_train_config, codebook_train_config, load_run
from tl_codebook.fsm.report import write_report
from tl_codebook.training.metrics_log import MetricsLogger

TIMING_KEYS = ("seconds", "phases")


def demo_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    add_demo_command(parser)
    return parser


def without_timings(metrics: dict) -> dict:
    """metrics.json minus wall-clock times (the only numbers a rerun may change)."""
    kept = {k: v for k, v in metrics.items() if k not in TIMING_KEYS}
    kept["training"] = {
        name: {k: v for k, v in run.items() if k != "seconds"}
        for name, run in metrics.get("training", {}).items()
    }
    return kept


def quick_toy(**changes) -> ExperimentConfig:
    """The toy preset cut to a few steps: a second per run, numbers that mean nothing."""
    settings = dict(
        base_steps=20,
        codebook_steps=10,
        num_codes=12,
        n_samples=16,
        n_held_out=32,
        n_intervention_prompts=12,
        progress=False,
    )
    return ExperimentConfig.toy().replace(**{**settings, **changes})


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
    with pytest.raises(ValueError, match="base_steps must be an integer, got '3'"):
        ExperimentConfig.from_dict({"base_steps": "3"})
    with pytest.raises(ValueError, match="attn.hook_z, hook_mlp_out"):
        ExperimentConfig(codebook_sites=("hook_resid_post",))
    with pytest.raises(ValueError, match="codebook_init='zeros' is not one of"):
        ExperimentConfig(codebook_init="zeros")
    assert ExperimentConfig.from_dict({"base_lr": 1}).base_lr == 1.0  # --set base_lr=1


def test_the_phases_train_with_the_demos_schedule_and_optimiser_settings():
    config = ExperimentConfig()
    fsm = FSM.generate(config.fsm_config())
    base = base_train_config(config, None)
    assert (base.mode, base.sites, base.steps, base.lr) == ("joint", [], 1200, 3e-3)
    assert (base.warmup_steps, base.schedule, base.min_lr_fraction) == (100, "cosine", 0.1)
    assert (base.model_weight_decay, base.bf16_autocast) == (0.1, False)
    tune = codebook_train_config(config, fsm, None)
    assert [(s.at, s.group) for s in tune.sites[:2]] == [
        ("blocks.0.attn.hook_z", True),
        ("blocks.0.hook_mlp_out", False),
    ]
    assert len(tune.sites) == 2 * config.n_layers
    assert (tune.lr, tune.model_lr_factor, tune.codebook_weight_decay) == (1e-3, 0.1, 0.01)
    assert (tune.warmup_steps, tune.schedule, tune.min_lr_fraction) == (50, "cosine", 0.1)
    assert (tune.codebook_init, tune.exclude_token_ids) == ("kmeans", [fsm.bos_token])
    assert (tune.num_codes, tune.k, tune.bf16_autocast) == (128, 1, False)


def test_cli_options_build_the_config(capsys):
    args = demo_parser().parse_args(
        ["--preset", "toy", "--set", "base_steps=7", "--set", "similarity=cosine"]
    )
    config = config_from_args(args)
    assert (config.base_steps, config.similarity, config.n_states) == (7, "cosine", 6)
    assert config_from_args(demo_parser().parse_args(["--paper-scale"])) == ExperimentConfig.paper()
    assert config_from_args(demo_parser().parse_args([])) == ExperimentConfig()
    with pytest.raises(ValueError, match="Did you mean 'base_steps'"):
        config_from_args(demo_parser().parse_args(["--set", "base_step=3"]))
    assert main(["demo", "--set", "base_step=3"]) == 2  # one error line, not a traceback
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("tl-codebook demo: error: --set: unknown config")


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
    with MetricsLogger(tmp_path / "training" / "base") as log:
        for step, loss in zip((5, 10, 15, 20), (2.0, 1.5, 1.2, 1.1)):
            log.log(step, {"loss": loss})
    write_metrics(
        tmp_path,
        {
            "config": ExperimentConfig.toy().to_dict(),
            "status": "running",
            "training": {"base": {"steps": 20, "log": "training/base/metrics.jsonl"}},
            "loss_floor": 0.9,
            "seconds": float("nan"),
        },
    )
    page = write_report(tmp_path)
    text = page.read_text()
    assert "running" in text and "not yet measured" in text
    assert (tmp_path / "training_curves.png").read_bytes().startswith(b"\x89PNG")
    assert not (tmp_path / "interventions.png").exists()
    assert json.loads((tmp_path / "metrics.json").read_text())["seconds"] is None  # strict JSON
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    """`tl-codebook demo --preset toy` once (about 10 s): its directory and printed summary."""
    out = tmp_path_factory.mktemp("toy") / "run"
    import contextlib
    import io

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["demo", "--preset", "toy", "--out", str(out), "--no-progress"]) == 0
    return out, printed.getvalue()


def test_the_toy_demo_learns_the_fsm_and_steers_through_its_codes(toy_run):
    out, _ = toy_run
    metrics = json.loads((out / "metrics.json").read_text())
    # a model that guesses uniform digits scores about 0.2 here (6 states, 2 edges, base 3);
    # one that knows the states but not the edges about E/N = 0.33
    assert metrics["base_transition_accuracy"] >= 0.85
    assert metrics["codebook_transition_accuracy"] >= 0.85
    assert metrics["base"]["first_transition_accuracy_exact"] >= 0.9
    floor = metrics["loss_floor"]
    assert floor < metrics["base"]["next_token_loss"] < floor + 0.05
    assert metrics["codebook"]["next_token_loss_before_fine_tuning"] > floor
    # steering with the found codes beats random codes and doing nothing, by a margin
    assert metrics["intervention_success"] >= 0.75
    assert metrics["intervention_success"] - metrics["intervention_success_random_code"] >= 0.3
    assert metrics["intervention_success"] - metrics["intervention_success_no_intervention"] >= 0.2


def test_the_toy_demo_writes_the_contract_files_and_keys(toy_run):
    out, printed = toy_run
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["status"] == "done"
    for key in CONTRACT_KEYS:
        assert type(metrics[key]) is float and 0.0 <= metrics[key] <= 1.0, key
    assert metrics["config"] == ExperimentConfig.toy().replace(progress=False).to_dict()
    assert set(metrics["phases"]) == {
        "base",
        "codebook",
        "state_codes",
        "interventions",
        "analysis",
    }
    assert all(type(v) is float and v > 0 for v in metrics["phases"].values())
    assert {k: v["steps"] for k, v in metrics["training"].items()} == {"base": 400, "codebook": 100}
    assert set(metrics["interventions"]) >= {
        "none",
        "steer",
        "steer_best_site",
        "steer_last_position",
        "random_code",
    }
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
        "training/base/metrics.jsonl",
        "training/codebook/metrics.jsonl",
    ):
        assert (out / name).is_file(), name
    # each phase checkpointed every 50 steps (the 2 newest kept)
    for phase, last in (("base", 400), ("codebook", 100)):
        steps = sorted(p.name for p in (out / "training" / phase / "checkpoints").glob("step-*"))
        assert steps == [f"step-{last - 50:08d}", f"step-{last:08d}"], phase
    html = (out / "index.html").read_text()
    assert all(png in html for png in ("training_curves.png", "interventions.png"))
    summary = json.loads(printed[printed.index("{\n") :])  # after the progress lines
    assert summary["intervention_success"] == metrics["intervention_success"]


def test_the_toy_demo_caches_its_codes_and_links_the_code_browser(toy_run):
    out, _ = toy_run
    metrics = json.loads((out / "metrics.json").read_text())
    config = ExperimentConfig.from_dict(metrics["config"])
    fsm, _, model = load_run(out)
    held_out = TokFSMDataset(fsm, config.seq_len, seed=config.seed).held_out(config.n_held_out)
    cache = CodeCache.open(out / "code_cache", model=model)  # built for the run's codebook model
    np.testing.assert_array_equal(cache.tokens, held_out.numpy())
    assert cache.hooks == config.hook_names()
    assert cache.vocab == ["0", "1", "2", "BOS"]  # base 3 digits and BOS
    with torch.no_grad():  # the cached ids are the ones the model computes
        _, acts = model.run_with_cache(held_out, names_filter=lambda n: n.endswith("hook_codes"))
    for hook in cache.hooks:
        np.testing.assert_array_equal(cache.codes(hook), acts[f"{hook}.hook_codes"].numpy())
    analysis = metrics["analysis"]
    for directory, key in (("code_cache", "cache"), ("dashboard", "site")):
        files = [p for p in (out / directory).rglob("*") if p.is_file()]
        assert analysis[f"{key}_bytes"] == sum(p.stat().st_size for p in files) > 0, key
        assert analysis[f"{key}_files"] == len(files), key
    assert (analysis["n_tokens"], analysis["hooks"]) == (held_out.numel(), len(cache.hooks))
    assert analysis["dashboard"] == "dashboard/index.html"
    assert (out / "dashboard" / "index.html").is_file()
    assert "href='dashboard/index.html'" in (out / "index.html").read_text()
    # the site is labelled with the FSM states and shows the steering conditions
    site = "".join(p.read_text() for p in (out / "dashboard").rglob("*.js") if "data" in p.parts)
    assert "state 5" in site and "force s′'s codes" in site


def test_cache_of_a_demo_run_defaults_to_its_held_out_sequences(toy_run, tmp_path, capsys):
    out, _ = toy_run
    assert main(["cache", str(out), "--out", str(tmp_path / "c"), "--quiet"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (
        summary["n_tokens"]
        == json.loads((out / "metrics.json").read_text())["analysis"]["n_tokens"]
    )
    mine, demo = CodeCache.open(tmp_path / "c"), CodeCache.open(out / "code_cache")
    np.testing.assert_array_equal(mine.tokens, demo.tokens)
    for hook in demo.hooks:
        np.testing.assert_array_equal(mine.codes(hook), demo.codes(hook))
    site = tmp_path / "site"
    argv = ["dashboard", str(tmp_path / "c"), "--out", str(site), "--model-dir", str(out)]
    assert main([*argv, "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out)["files"] == len(
        [p for p in site.rglob("*") if p.is_file()]
    )
    assert main(["cache", str(out), "--model", "gpt2", "--out", str(tmp_path / "d")]) == 2
    assert "holds its own model" in capsys.readouterr().err


def test_a_finished_run_loads_back_with_the_losses_it_measured(toy_run):
    out, _ = toy_run
    metrics = json.loads((out / "metrics.json").read_text())
    fsm, base, model = load_run(out)
    config = ExperimentConfig.from_dict(metrics["config"])
    held_out = TokFSMDataset(fsm, config.seq_len, seed=config.seed).held_out(config.n_held_out)
    assert set(model.codebooks) == set(config.hook_names()) and not base.codebooks
    for key, loaded in (("base", base), ("codebook", model)):  # metrics.json: 6 digits
        expected = metrics[key]["next_token_loss"]
        assert next_token_loss(loaded, held_out) == pytest.approx(expected, abs=1e-6), key


def test_a_run_directory_with_results_is_not_overwritten_silently(toy_run, capsys):
    out, _ = toy_run
    before = (out / "metrics.json").read_bytes()
    assert main(["demo", "--preset", "toy", "--out", str(out)]) == 2
    assert "already holds a TokFSM run (status 'done')" in capsys.readouterr().err
    assert main(["demo", "--resume", "--preset", "toy", "--out", str(out)]) == 2
    assert "drop --preset" in capsys.readouterr().err
    assert main(["demo", "--resume", "--out", str(out), "--no-progress"]) == 0  # finished: no-op
    assert "has finished; nothing to resume" in capsys.readouterr().out
    assert (out / "metrics.json").read_bytes() == before
    with pytest.raises(ValueError, match="nothing to resume"):
        run_experiment(quick_toy(), out.parent / "empty", resume=True)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """`quick_toy()` run once, uninterrupted: what reruns and resumed runs must reproduce."""
    return run_experiment(quick_toy(), tmp_path_factory.mktemp("quick") / "run", log=print)


def test_same_seed_same_metrics_other_seed_other_metrics(tmp_path, quick_run):
    out = tmp_path / "run"
    other = run_experiment(quick_toy(seed=1), out, log=lambda _: None)
    for key in ("base", "codebook"):
        assert other[key]["next_token_loss"] != quick_run[key]["next_token_loss"], key
    assert other["state_codes"] != quick_run["state_codes"]
    (out / "notes.txt").write_text("mine")
    # --overwrite replaces the seed-1 run by a seed-0 one: exactly the first seed-0 run's numbers
    again = run_experiment(quick_toy(), out, log=lambda _: None, overwrite=True)
    assert without_timings(again) == without_timings(quick_run)
    assert (out / "notes.txt").read_text() == "mine"  # overwrite deletes only the run's own files


class Stop(Exception):
    """Raised by a log callback to stop a run between two phases."""


def test_resume_after_each_phase_gives_the_uninterrupted_results(tmp_path, quick_run):
    config = quick_toy()
    for stop_after in ("1/5 base model", "2/5 codebook model", "4/5 interventions"):
        out = tmp_path / stop_after[0]

        def stop(line: str, prefix: str = stop_after) -> None:
            if line.startswith(prefix):
                raise Stop(prefix)

        with pytest.raises(Stop):
            run_experiment(config, out, log=stop)
        status = json.loads((out / "metrics.json").read_text())["status"]
        assert status.startswith("failed: Stop"), status
        with pytest.raises(ValueError, match="its config differs .*base_steps"):
            run_experiment(config.replace(base_steps=21), out, resume=True)
        lines: list[str] = []
        resumed = run_experiment(config, out, log=lines.append, resume=True)
        assert without_timings(resumed) == without_timings(quick_run), stop_after
        assert any("finished before, loaded" in line for line in lines)


@pytest.mark.slow
@pytest.mark.parametrize("phase", ["base", "codebook"])
def test_a_demo_killed_mid_phase_resumes_to_the_uninterrupted_results(tmp_path, toy_run, phase):
    """SIGKILL `tl-codebook demo` right after its first checkpoint of `phase`, then --resume:
    the same numbers as the uninterrupted toy run (the trainer resumes bit-exactly)."""
    out = tmp_path / "run"
    first = out / "training" / phase / "checkpoints" / "step-00000050"
    command = [sys.executable, "-m", "tl_codebook.cli", "demo", "--preset", "toy"]
    process = subprocess.Popen(
        [*command, "--out", str(out), "--no-progress"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        while not first.is_dir() and process.poll() is None:
            time.sleep(0.02)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait()
    assert process.returncode == -signal.SIGKILL
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["status"] == "running" and phase not in metrics  # killed inside the phase
    resumed = run_experiment(
        ExperimentConfig.toy().replace(progress=False), out, log=lambda _: None, resume=True
    )
    uninterrupted = json.loads((toy_run[0] / "metrics.json").read_text())
    assert without_timings(resumed) == without_timings(uninterrupted)
