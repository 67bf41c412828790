"""The `tl-codebook` command: version/help, and `train` end to end on local files."""

import json

import pytest
import torch

import tl_codebook
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
