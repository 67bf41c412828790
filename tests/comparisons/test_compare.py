"""The comparison end to end on a tiny TokFSM: matched budgets, the report files, bad input."""

import argparse
import json
import math

import pytest
import torch

from tl_codebook import Codebook
from tl_codebook.comparisons.cli import add_compare_command, method_specs
from tl_codebook.comparisons.compare import (
    CONTRACT_COLUMNS,
    ComparisonConfig,
    ComparisonResult,
    run,
)
from tl_codebook.comparisons.methods import MethodSpec, TrainingConfig
from tl_codebook.comparisons.metrics import EvalConfig
from tl_codebook.comparisons.store import ActivationStore
from tl_codebook.fsm import FSM, FSMConfig, TokFSMDataset
from tl_codebook.fsm.task import TokFSMTask
from tl_codebook.hooks.model import HookedCodebookTransformer

RESID = "blocks.0.hook_resid_post"
HOOK_Z = "blocks.1.attn.hook_z"


@pytest.fixture(scope="module")
def tokfsm(tmp_path_factory, make_tiny_cfg):
    """An (untrained) model over a small TokFSM, with a training and an evaluation store."""
    fsm = FSM.generate(FSMConfig(n_states=6, n_edges=2, base=3, seed=0))
    model = HookedCodebookTransformer(make_tiny_cfg(d_vocab=fsm.vocab_size, n_ctx=12)).eval()
    data = TokFSMDataset(fsm, seq_len=12, seed=0)
    root = tmp_path_factory.mktemp("tokfsm")
    meta = {"task": TokFSMTask(fsm, seq_len=12).to_dict()}
    train = ActivationStore.build(
        model,
        next(data.batches(64)),
        [RESID, HOOK_Z],
        root / "train",
        metadata=meta,
        progress=False,
    )
    held_out = ActivationStore.build(
        model, data.held_out(16), [RESID, HOOK_Z], root / "eval", metadata=meta, progress=False
    )
    return model, fsm, train, held_out


def small_config(fsm: FSM, **training) -> ComparisonConfig:
    settings = dict(
        hook_name=RESID,
        d_sae=12,
        k=1,
        training_tokens=1000,
        batch_size=128,
        exclude_token_ids=[fsm.bos_token],
        init_tokens=256,
        kmeans_iters=5,
        progress=False,
    )
    settings.update(training)
    return ComparisonConfig(
        training=TrainingConfig(**settings),
        evaluation=EvalConfig(steering_prompts=12, progress=False),
    )


@pytest.fixture(scope="module")
def result(tokfsm, tmp_path_factory) -> tuple[ComparisonResult, str]:
    model, fsm, train, held_out = tokfsm
    out = tmp_path_factory.mktemp("report")
    res = run(
        train,
        ["codebook", "codebook_saelens", "topk"],
        small_config(fsm),
        model=model,
        eval_store=held_out,
        out_dir=out,
    )
    return res, out


def test_every_method_saw_the_same_number_of_tokens(result) -> None:
    res, _ = result
    assert [r["train_tokens"] for r in res.rows] == [1000, 1000, 1000]  # 7 x 128 + a last 104
    assert res.matched_budget()
    assert all(r["tokens_per_second"] > 0 and r["train_seconds"] > 0 for r in res.rows)


def test_our_codebook_loop_and_saelens_trainer_agree(result) -> None:
    res, _ = result
    [agreement] = res.agreement
    assert agreement["ours"] == "codebook-k1" and agreement["saelens"] == "codebook_saelens-k1"
    assert agreement["same_codes_fraction"] > 0.99
    assert agreement["max_code_difference"] < 1e-4
    assert res.row("codebook-k1")["explained_variance"] == pytest.approx(
        res.row("codebook_saelens-k1")["explained_variance"], abs=1e-4
    )


def test_rows_hold_the_contract_columns_and_tokfsm_metrics(result) -> None:
    res, out = result
    rows = json.loads((out / "comparison.json").read_text())
    assert [r["method"] for r in rows] == ["codebook-k1", "codebook_saelens-k1", "topk-k1"]
    for row in rows:
        assert set(CONTRACT_COLUMNS) <= set(row)
        assert row["l0"] == pytest.approx(1.0)
        assert 0 <= row["states_with_precise_latent"] <= 1
        assert 0 <= row["steering_success"] <= 1
        assert row["ce_loss_recovered"] is not None and row["kl"] >= 0


def test_the_report_directory_has_every_file(result) -> None:
    res, out = result
    for name in (
        "comparison.csv",
        "comparison.json",
        "comparison.md",
        "details.json",
        "index.html",
        "fve_vs_l0.png",
        "ce_recovered_vs_l0.png",
        "latent_density.png",
        "state_precision_recall.png",
        "steering.png",
    ):
        assert (out / name).stat().st_size > 0, name
    assert (out / "methods" / "codebook-k1" / "codebook.safetensors").is_file()
    assert (out / "methods" / "topk-k1" / "cfg.json").is_file()
    csv_text = (out / "comparison.csv").read_text()
    assert csv_text.splitlines()[0].startswith("method,kind,hook_name")
    assert (
        "| codebook-k1 |" in res.to_markdown()
        and "Matched budget: yes" in (out / "comparison.md").read_text()
    )
    loaded = ComparisonResult.load(out)
    assert [r["method"] for r in loaded.rows] == [r["method"] for r in res.rows]
    assert loaded.agreement == res.agreement
    assert res.plot().axes  # one Figure with every panel


def test_trained_objects_are_evaluated_not_retrained(result, tokfsm) -> None:
    res, _ = result
    model, fsm, train, held_out = tokfsm
    again = run(
        train, [res.methods["codebook-k1"]], small_config(fsm), model=model, eval_store=held_out
    )
    assert again.rows[0]["explained_variance"] == res.row("codebook-k1")["explained_variance"]


def test_group_codebooks_at_hook_z_splice_back_into_the_heads(tokfsm) -> None:
    model, fsm, train, held_out = tokfsm
    config = small_config(fsm, hook_name=HOOK_Z, d_sae=16)
    res = run(train, ["codebook:n_groups=4"], config, model=model, eval_store=held_out)
    [row] = res.rows
    assert row["d_in"] == 16 and row["l0"] == 4  # one code per head
    assert math.isfinite(row["ce_loss_score"]) and row["kl_div_with_sae"] >= 0


def test_bad_methods_and_mismatches_are_refused(tokfsm, tmp_path) -> None:
    model, fsm, train, held_out = tokfsm
    with pytest.raises(
        ValueError,
        match="Unknown method 'topkk'; valid methods are codebook, .*Did you mean 'topk'",
    ):
        run(train, ["topkk"], small_config(fsm))
    out = tmp_path / "refused"
    with pytest.raises(ValueError, match=r"'topk-k64' \(topk\): k=64 is more than d_sae=12"):
        run(train, ["codebook", "topk:k=64"], small_config(fsm), out_dir=out)
    assert not out.exists()  # refused before the codebook (listed first) trained
    with pytest.raises(ValueError, match="n_groups=5 must divide the activations' width d_in=16"):
        run(train, ["codebook:n_groups=5:d_sae=10"], small_config(fsm))
    with pytest.raises(ValueError, match="Two methods are named 'a'"):
        run(train, ["codebook:name=a", "topk:name=a"], small_config(fsm), out_dir=out)
    assert not out.exists()
    with pytest.raises(ValueError, match="Bad method option 'kk=2'"):
        MethodSpec.parse("topk:kk=2")
    with pytest.raises(ValueError, match="no activations at 'blocks.1.hook_resid_post'"):
        run(train, ["codebook"], small_config(fsm, hook_name="blocks.1.hook_resid_post"))
    wide = ActivationStore.write(
        tmp_path / "w", {RESID: torch.zeros(2, 12, 8)}, torch.zeros(2, 12).long(), "m", "f"
    )
    with pytest.raises(ValueError, match="d_in=16, but the store's activations at .* width 8"):
        run(wide, [res_method(train, fsm)], small_config(fsm))


def res_method(store, fsm):
    from tl_codebook.comparisons.methods import train_method

    return train_method(MethodSpec("codebook"), store, small_config(fsm).training)


def test_cli_specs_and_a_tiny_end_to_end_run(tmp_path) -> None:
    specs = method_specs(["codebook", "topk:k=3", "standard"], [1, 4])
    assert [(s.kind, s.k) for s in specs] == [
        ("codebook", 1),
        ("codebook", 4),
        ("topk", 3),
        ("standard", None),
    ]
    parser = argparse.ArgumentParser()
    add_compare_command(parser)
    args = parser.parse_args(
        [
            "--out",
            str(tmp_path),
            "--lm-steps",
            "2",
            "--store-sequences",
            "16",
            "--eval-sequences",
            "8",
            "--method",
            "codebook",
            "--ks",
            "1",
            "--d-sae",
            "16",
            "--training-tokens",
            "512",
            "--batch-size",
            "256",
            "--steering-prompts",
            "4",
            "--quiet",
        ]
    )
    threads = torch.get_num_threads()
    try:
        assert args.func(args) == 0
    finally:
        torch.set_num_threads(threads)  # the command sets the process's thread count
    rows = json.loads((tmp_path / "comparison.json").read_text())
    assert [r["method"] for r in rows] == ["codebook-k1"]
    [row] = rows
    # known answers: 8 held-out sequences of 32 tokens without their BOS, one code per token,
    # the asked budget, and the explained variance of the saved codebook worked out by hand
    assert row["eval_tokens"] == 8 * 31 and row["l0"] == 1.0 and row["train_tokens"] == 512
    codebook = Codebook.load(tmp_path / "methods" / "codebook-k1")
    store = ActivationStore.open(tmp_path / "store" / "eval")
    tokens, acts = store.tokens(), store.activations(RESID)
    x = acts[tokens != 10].double()  # BOS is token 10 of the default TokFSM (base 10)
    with torch.no_grad():
        error = (codebook(x.float()).double() - x).pow(2).sum(-1).mean()
    variance = x.pow(2).sum(-1).mean() - x.mean(0).pow(2).sum()
    assert row["explained_variance"] == pytest.approx(1 - (error / variance).item(), abs=1e-5)
    assert row["mse"] == pytest.approx(error.item(), rel=1e-5)
    assert row["fve"] == row["explained_variance"]
    assert (tmp_path / "base_model" / "model.safetensors").is_file()


def test_the_store_names_its_task_and_the_task_excludes_bos(result, tokfsm) -> None:
    """Without exclude_token_ids the task's exclusions apply (TokFSM: BOS); [] excludes nothing."""
    res, _ = result
    model, fsm, train, held_out = tokfsm
    method = res.methods["codebook-k1"]
    tokens = held_out.tokens()
    config = small_config(fsm, exclude_token_ids=None)
    [row] = run(train, [method], config, model=model, eval_store=held_out).rows
    assert row["eval_tokens"] == int((tokens != fsm.bos_token).sum()) == 16 * 11
    assert row["concepts_with_precise_latent"] >= 0  # the task came from the store's metadata
    [everything] = run(
        train, [method], small_config(fsm, exclude_token_ids=[]), eval_store=held_out
    ).rows
    assert everything["eval_tokens"] == 16 * 12
