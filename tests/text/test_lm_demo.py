"""`tl-codebook demo --task lm` end to end at the toy scale, on the real model and corpus: every
contract number of metrics.json, the code cache and the report, read back; and its bad options."""

import json
import math

import numpy as np
import pytest

from tl_codebook.analysis.cache import CodeCache
from tl_codebook.cli import main
from tl_codebook.text.experiment import CONTRACT_KEYS

TOY = ["demo", "--task", "lm", "--preset", "toy", "--no-progress"]


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("lm") / "run"
    assert main([*TOY, "--out", str(out)]) == 0
    return out, json.loads((out / "metrics.json").read_text())


def test_toy_run_records_every_contract_number(toy_run):
    out, metrics = toy_run
    assert metrics["status"] == "done" and metrics["task"] == "lm"
    for key in CONTRACT_KEYS:
        if key == "steering_success_sae":
            continue
        assert isinstance(metrics[key], float) and math.isfinite(metrics[key]), key
    lm = metrics["lm"]
    # metrics.json rounds floats to 6 digits
    assert lm["delta_loss"] == pytest.approx(lm["codebook_loss"] - lm["base_loss"], abs=2e-6)
    gap = lm["zero_ablated_loss"] - lm["base_loss"]
    assert metrics["ce_loss_recovered"] == pytest.approx(
        (lm["zero_ablated_loss"] - lm["codebook_loss"]) / gap, abs=1e-4
    )
    assert 0.0 <= metrics["dead_fraction"] <= 1.0
    for key in ("steering_success", "steering_success_none", "steering_success_random_code"):
        assert 0.0 <= metrics[key] <= 1.0


def test_toy_run_cache_opens_and_holds_one_row_per_article(toy_run):
    out, metrics = toy_run
    cache = CodeCache.open(out / "code_cache")
    assert cache.hooks == ["blocks.10.attn.hook_z", "blocks.14.attn.hook_z"]
    assert (cache.n_seq, cache.seq_len) == (15, 64)
    tokens = np.asarray(cache.tokens)
    assert (tokens[:, 0] == tokens[0, 0]).all()  # every row starts with BOS
    # every topic's best code was searched against that topic's articles
    assert sorted(metrics["concepts"]["topics"]) == [
        "business",
        "entertainment",
        "politics",
        "sports",
        "tech",
    ]


def test_toy_run_steering_samples_are_judged_and_shown(toy_run):
    out, metrics = toy_run
    steering = metrics["steering"]
    for condition in ("none", "codebook", "random_code"):
        samples = steering["samples"][condition]
        assert sorted(samples) == ["business", "entertainment", "politics", "sports", "tech"]
        for rows in samples.values():
            assert len(rows) == 2
            for row in rows:
                assert row["steered"] == (row["on_topic"] and row["fluent"])
    # unsteered samples are made once: the same texts are judged against every topic
    texts = {t: [r["text"] for r in rows] for t, rows in steering["samples"]["none"].items()}
    assert len({tuple(v) for v in texts.values()}) == 1
    page = (out / "index.html").read_text()
    first = steering["samples"]["codebook"]["sports"][0]["text"]
    assert "Example generations" in page and first.strip()[:20].replace("&", "&amp;") in page
    n = steering["conditions"]["codebook"]["n"]
    assert n == 5 * 2 and f"({n} generations a condition" in page
    assert "codebook &minus; none: " in page and "codebook &minus; sae: " in page
    assert (out / "dashboard" / "index.html").is_file()


def test_finished_run_is_refused_without_resume_and_returns_on_resume(toy_run, capsys):
    out, metrics = toy_run
    assert main([*TOY, "--out", str(out)]) == 2
    assert "already holds a run (status 'done')" in capsys.readouterr().err
    assert main(["demo", "--task", "lm", "--out", str(out), "--resume"]) == 0
    assert json.loads((out / "metrics.json").read_text())["seconds"] == metrics["seconds"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["--set", "topics=sport"],
            "topics entry='sport' is not one of business, entertainment, politics, sports, tech",
        ),
        (["--preset", "paper-fsm"], "--task lm has no preset 'paper-fsm'"),
        (["--scale", "cpu"], "--preset toy and --scale cpu disagree"),
        (["--set", "nmu_codes=3"], "unknown config field 'nmu_codes'"),
        (
            ["--set", "prompts=" + "word " * 2100, "--set", "model=smollm2-135m"],
            "exceeds the model's context of 2048",
        ),
    ],
)
def test_bad_options_name_the_problem(tmp_path, capsys, argv, message):
    assert main([*TOY, "--out", str(tmp_path / "bad"), *argv]) == 2
    assert message in capsys.readouterr().err
