"""`tl-codebook compare`: every user error is one line (exit 2), raised before any training."""

import json

import pytest
from safetensors.torch import save_file
from transformer_lens import HookedTransformer, HookedTransformerConfig

from tl_codebook.cli import main
from tl_codebook.comparisons.methods import MethodSpec
from tl_codebook.fsm import FSM, FSMConfig

TINY = [
    "--lm-steps",
    "1",
    "--store-sequences",
    "8",
    "--eval-sequences",
    "4",
    "--ks",
    "1",
    "--d-sae",
    "16",
    "--training-tokens",
    "64",
    "--batch-size",
    "32",
    "--steering-prompts",
    "2",
    "--quiet",
]


def compare_error(capsys, out, *argv: str) -> str:
    """Run `tl-codebook compare`, expect exit code 2 and one error line; return that line."""
    code = main(["compare", "--out", str(out), *TINY, *argv])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("tl-codebook compare: error: ") and "\n" not in err, err
    return err


def test_a_method_name_that_leaves_out_is_refused_before_any_work(tmp_path, capsys) -> None:
    out = tmp_path / "run"
    err = compare_error(capsys, out, "--method", "codebook:name=../../escaped")
    assert "'../../escaped' is not allowed" in err
    assert not (tmp_path / "escaped").exists() and not (out / "base_model").exists()
    for bad in ("a/b", "..", "", "x y"):
        with pytest.raises(ValueError, match="is not allowed"):
            MethodSpec("codebook", name=bad)


def test_k_larger_than_d_sae_is_refused_before_training(tmp_path, capsys) -> None:
    out = tmp_path / "run"
    err = compare_error(capsys, out, "--method", "topk:k=64")
    assert "k=64" in err and "d_sae=16" in err
    assert not (out / "base_model").exists()  # the base model was not trained
    err = compare_error(capsys, out, "--method", "codebook:n_groups=3")
    assert "n_groups=3" in err and "d_sae=16" in err


def test_bad_method_kinds_options_and_ks_are_one_line(tmp_path, capsys) -> None:
    out = tmp_path / "run"
    assert "Did you mean 'topk'" in compare_error(capsys, out, "--method", "topkk")
    assert "'k=abc'" in compare_error(capsys, out, "--method", "topk:k=abc")
    assert "--ks" in compare_error(capsys, out, "--ks", "1,x")
    assert not (out / "base_model").exists()


@pytest.mark.parametrize("flag", ["--store-sequences", "--eval-sequences", "--training-tokens"])
def test_zero_tokens_are_refused_before_training(tmp_path, capsys, flag) -> None:
    out = tmp_path / "run"
    err = compare_error(capsys, out, flag, "0")
    assert flag in err and "got 0" in err
    assert not (out / "base_model").exists()


def write_model_dir(root, d_model: int = 16) -> None:
    """A directory as `tl-codebook compare` saves it: fsm.json and base_model/."""
    fsm = FSM.generate(FSMConfig(n_states=6, n_edges=2, base=3, seed=0))
    kwargs = dict(
        n_layers=1,
        d_model=d_model,
        n_ctx=12,
        d_head=4,
        n_heads=d_model // 4,
        d_mlp=32,
        d_vocab=fsm.vocab_size,
        act_fn="relu",
        seed=0,
    )
    model = HookedTransformer(HookedTransformerConfig(**kwargs, device="cpu"))
    (root / "base_model").mkdir(parents=True)
    fsm.save(root / "fsm.json")
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()},
        str(root / "base_model" / "model.safetensors"),
    )
    (root / "base_model" / "config.json").write_text(json.dumps({"model": kwargs}))


def truncate(path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_truncated_or_mismatched_model_dir_files_are_named(tmp_path, capsys) -> None:
    for broken, damage in (
        ("fsm.json", truncate),
        ("base_model/config.json", truncate),
        ("base_model/model.safetensors", truncate),
    ):
        model_dir = tmp_path / broken.replace("/", "_")
        write_model_dir(model_dir)
        damage(model_dir / broken)
        err = compare_error(capsys, tmp_path / "out", "--model-dir", str(model_dir))
        assert str(model_dir / broken) in err, err
    # weights of a d_model=16 model under a config that says d_model=32
    mismatched = tmp_path / "mismatched"
    write_model_dir(mismatched)
    config = mismatched / "base_model" / "config.json"
    kwargs = json.loads(config.read_text())["model"]
    config.write_text(json.dumps({"model": {**kwargs, "d_model": 32, "n_heads": 8}}))
    err = compare_error(capsys, tmp_path / "out", "--model-dir", str(mismatched))
    assert str(mismatched / "base_model" / "model.safetensors") in err
    assert "do not fit" in err
    assert not (tmp_path / "out" / "store").exists()
