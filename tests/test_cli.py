"""The `tl-codebook` command: version/help, and `train` end to end on local files."""

import json
import re

import pytest
import torch

import tl_codebook
import tl_codebook.io
from tl_codebook import HookedCodebookTransformer
from tl_codebook.cli import main


def test_version_and_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"tl-codebook {tl_codebook.__version__}"
    assert main([]) == 0
    assert "train" in capsys.readouterr().out


def test_train_command_on_a_local_tokenized_file(tmp_path, tiny_cfg):
    cfg_path = tmp_path / "model.json"
    cfg_path.write_text(json.dumps(tiny_cfg.to_dict(), default=str))
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(0, 11, (16,), generator=g).tolist() for _ in range(64)]
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps({"tokens": r}) for r in rows))
    out = tmp_path / "run"
    argv = [
        "train",
        "--model",
        str(cfg_path),
        "--dataset",
        str(data),
        "--mode",
        "frozen",
        "--at",
        "hook_mlp_out",
        "--at",
        "attn.hook_z:group:num_codes=8",
        "--layers",
        "1",
        "--num-codes",
        "16",
        "--steps",
        "6",
        "--batch-size",
        "4",
        "--seq-len",
        "12",
        "--checkpoint-every",
        "3",
        "--out",
        str(out),
        "--quiet",
    ]
    assert main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 6
    assert summary["codebooks"] == ["blocks.1.attn.hook_z", "blocks.1.hook_mlp_out"]
    saved = json.loads((out / "codebooks" / "codebooks.json").read_text())
    assert saved["codebooks"]["blocks.1.attn.hook_z"]["num_codes"] == 8
    assert saved["codebooks"]["blocks.1.hook_mlp_out"]["num_codes"] == 16
    assert (out / "checkpoints" / "step-00000006").is_dir()
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1  # log_every=10: the last step
    model = HookedCodebookTransformer(tiny_cfg)
    model.load_codebooks(out / "codebooks")
    assert set(model.codebooks) == set(summary["codebooks"])


def test_train_command_rejects_bad_flags_before_work(tmp_path, tiny_cfg, capsys):
    cfg_path = tmp_path / "model.json"
    cfg_path.write_text(json.dumps(tiny_cfg.to_dict(), default=str))
    argv = ["train", "--model", str(cfg_path), "--dataset", "x.txt", "--out", str(tmp_path / "o")]
    assert main([*argv, "--at", "hook_mlp_out:kk=2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tl-codebook train: error: ") and err.count("\n") == 1
    assert "unknown option 'kk'" in err
    assert not (tmp_path / "o").exists()  # no work started, nothing written
    with pytest.raises(SystemExit):
        main([*argv, "--mode", "frozn"])
    assert "invalid choice: 'frozn'" in capsys.readouterr().err


def write_run_inputs(tmp_path, tiny_cfg, rows=None):
    """The tiny model as a config JSON and 40 rows of 16 tokens as a local .jsonl file."""
    model_json = tmp_path / "model.json"
    model_json.write_text(json.dumps(tiny_cfg.to_dict(), default=str))
    rows = rows if rows is not None else [[(i + j) % 11 for i in range(16)] for j in range(40)]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"tokens": r}) + "\n" for r in rows))
    return model_json, data


def hf_dir_with_truncated_weights(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=11, n_positions=32)
    GPT2LMHeadModel(config).save_pretrained(tmp_path / "hf")
    weights = tmp_path / "hf" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    return ["--model", str(tmp_path / "hf"), "--architecture", "gpt2"]


def model_json_with(tmp_path, tiny_cfg, **changes):
    path = tmp_path / "changed-model.json"
    path.write_text(json.dumps({**tiny_cfg.to_dict(), **changes}, default=str))
    return ["--model", str(path)]


def data_file(tmp_path, text):
    path = tmp_path / "bad.jsonl"
    path.write_text(text)
    return ["--dataset", str(path)]


def token_rows(first_token):
    return "".join(json.dumps({"tokens": [first_token, *range(1, 10)]}) + "\n" for _ in range(8))


BAD_TRAIN_INPUTS = {
    "empty jsonl": (lambda p, c: data_file(p, ""), r"file '.*bad.jsonl' is empty"),
    "blank jsonl": (lambda p, c: data_file(p, "\n"), r"file '.*bad.jsonl' holds no records"),
    "0-token rows": (
        lambda p, c: data_file(p, '{"tokens": []}\n' * 8),
        "does not fill one batch of 2 rows of 8 tokens",
    ),
    "token id >= d_vocab": (
        lambda p, c: data_file(p, token_rows(11)),
        r"Token ids must lie in the model's vocabulary \[0, 11\); a batch holds ids from 1 to 11",
    ),
    "negative token id": (
        lambda p, c: data_file(p, token_rows(-3)),
        r"vocabulary \[0, 11\); a batch holds ids from -3 to 9",
    ),
    "BOS id >= d_vocab": (
        lambda p, c: ["--bos-token-id", "99"],
        r"BOS token id 99 is outside the model's vocabulary \[0, 11\)",
    ),
    "negative BOS id": (lambda p, c: ["--bos-token-id", "-1"], "BOS token id -1 is outside"),
    "empty layer range": (
        lambda p, c: ["--layers", "1-0"],
        r"Layer range '1-0' in layers '1-0' is empty",
    ),
    "string-valued number in the model config": (
        lambda p, c: model_json_with(p, c, d_model="16"),
        r"changed-model.json: HookedTransformerConfig.d_model must be an integer, got '16'",
    ),
    "model config asking for remote code": (
        lambda p, c: model_json_with(p, c, trust_remote_code=True),
        r"changed-model.json sets trust_remote_code=True.*Pass --trust-remote-code",
    ),
    "truncated weights in a model dir": (
        lambda p, c: hf_dir_with_truncated_weights(p),
        r"cannot load the Hugging Face model in .*hf .*model.safetensors",
    ),
}


@pytest.mark.parametrize("case", list(BAD_TRAIN_INPUTS))
def test_train_user_errors_are_one_line_naming_the_bad_value(tmp_path, tiny_cfg, capsys, case):
    model_json, data = write_run_inputs(tmp_path, tiny_cfg)
    make_args, message = BAD_TRAIN_INPUTS[case]
    argv = ["train", "--model", str(model_json), "--dataset", str(data), "--mode", "frozen"]
    argv += ["--at", "hook_mlp_out", "--num-codes", "4", "--steps", "2", "--batch-size", "2"]
    argv += ["--seq-len", "8", "--out", str(tmp_path / "run"), "--quiet"]
    extra = make_args(tmp_path, tiny_cfg)  # later flags win
    capsys.readouterr()
    assert main(argv + extra) == 2
    err = capsys.readouterr().err
    assert err.startswith("tl-codebook train: error: ") and err.count("\n") == 1, err
    assert re.search(message, err), err
    assert not (tmp_path / "run" / "summary.json").exists()


def test_trust_remote_code_flag_reaches_the_loader(tmp_path, tiny_cfg, capsys, monkeypatch):
    seen = []

    def recording_load_model(model, device=None, architecture=None, trust_remote_code=False):
        seen.append(trust_remote_code)
        raise ValueError("stop here")

    monkeypatch.setattr(tl_codebook.io, "load_model", recording_load_model)
    model_json, data = write_run_inputs(tmp_path, tiny_cfg)
    argv = ["train", "--model", str(model_json), "--dataset", str(data), "--at", "hook_mlp_out"]
    for extra, out in (([], "a"), (["--trust-remote-code"], "b")):
        assert main([*argv, "--out", str(tmp_path / out), *extra]) == 2
    assert seen == [False, True]
    assert "stop here" in capsys.readouterr().err
