"""`tl-codebook cache`, `search` and `dashboard` end to end on a tiny `tl-codebook train` run.

The run's codebook at `hook_embed` is set to the model's own embedding rows (cosine), so token t
snaps to code t: searching a token must find exactly its code with precision and recall 1.
Every bad input is one line on stderr and exit code 2.
"""

import json
import shutil

import numpy as np
import pytest
import torch

from tl_codebook import HookedCodebookTransformer
from tl_codebook.analysis.cache import CodeCache
from tl_codebook.cli import main

SEQ_LEN = 12
N_DOCS, DOC_LEN = 40, 16
# documents are packed back to back (no BOS, no separator) and cut into rows of SEQ_LEN tokens
N_ROWS = N_DOCS * DOC_LEN // SEQ_LEN  # 53: the last batch of 5 holds 3 rows and must be kept


def documents() -> list[list[int]]:
    """Consecutive digits mod 10 (token 10 never occurs), so the decoded text has one
    character per token and every 3 is followed by a 4 inside a document."""
    return [[(i + j) % 10 for i in range(DOC_LEN)] for j in range(N_DOCS)]


def run_cli(capsys, *argv: str) -> str:
    code = main(list(argv))
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return captured.out


def one_line_error(capsys, command: str, *argv: str) -> str:
    assert main([command, *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"tl-codebook {command}: error: ") and err.count("\n") == 1, err
    return err


def write_model_json(path, cfg, **changes):
    path.write_text(json.dumps({**cfg.to_dict(), **changes}, default=str))
    return path


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, make_tiny_cfg):
    """A frozen `tl-codebook train` run (hook_embed + blocks.1.hook_mlp_out + a per-head
    blocks.1.attn.hook_z codebook) whose hook_embed codes are then set to W_E, and its data."""
    root = tmp_path_factory.mktemp("cli")
    cfg = make_tiny_cfg()
    model_json = write_model_json(root / "model.json", cfg)
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps({"tokens": d}) + "\n" for d in documents()))
    run = root / "run"
    argv = ["train", "--model", str(model_json), "--dataset", str(data), "--mode", "frozen"]
    argv += ["--at", "hook_embed:num_codes=11:similarity=cosine", "--at", "hook_mlp_out"]
    argv += ["--at", "attn.hook_z:group:num_codes=8", "--layers", "1", "--num-codes", "16"]
    argv += ["--steps", "2", "--batch-size", "4", "--seq-len", str(SEQ_LEN), "--out", str(run)]
    assert main([*argv, "--quiet"]) == 0
    model = HookedCodebookTransformer(cfg)
    model.load_codebooks(run / "codebooks")
    with torch.no_grad():
        model.codebooks["hook_embed"].codes.copy_(model.W_E[None])
    model.save_codebooks(run / "codebooks")
    return {"root": root, "cfg": cfg, "data": data, "run": run, "model_json": model_json}


@pytest.fixture(scope="module")
def cache_dir(workspace):
    out = workspace["root"] / "cache"
    argv = ["cache", str(workspace["run"]), "--data", str(workspace["data"]), "--out", str(out)]
    assert main([*argv, "--batch-size", "5", "--seq-len", str(SEQ_LEN), "--quiet"]) == 0
    return out


def test_cache_holds_every_row_of_the_packed_corpus(cache_dir):
    cache = CodeCache.open(cache_dir)
    assert (cache.n_seq, cache.seq_len) == (N_ROWS, SEQ_LEN)
    stream = np.concatenate(documents())[: N_ROWS * SEQ_LEN].reshape(N_ROWS, SEQ_LEN)
    np.testing.assert_array_equal(cache.tokens, stream)
    assert set(cache.hooks) == {"hook_embed", "blocks.1.hook_mlp_out", "blocks.1.attn.hook_z"}
    # the embedding codebook: token t -> code t
    np.testing.assert_array_equal(cache.codes("hook_embed")[..., 0, 0], stream)
    assert cache.vocab[:11] == [str(i) for i in range(11)]  # no tokenizer: str(id)


def test_cache_command_prints_its_summary(workspace, capsys):
    out = workspace["root"] / "cache-limited"
    printed = run_cli(
        capsys,
        "cache",
        str(workspace["run"]),
        "--data",
        str(workspace["data"]),
        "--out",
        str(out),
        "--max-sequences",
        "7",
        "--hooks",
        "hook_embed",
        "--seq-len",
        "10",
        "--quiet",
    )
    summary = json.loads(printed)
    files = [p for p in out.rglob("*") if p.is_file()]
    assert summary == {
        "cache": str(out),
        "n_seq": 7,
        "seq_len": 10,
        "n_tokens": 70,
        "hooks": ["hook_embed"],
        "bytes": sum(p.stat().st_size for p in files),
        "files": len(files),
    }


def test_search_by_token_finds_its_own_code_first_and_sorts_by_f1(cache_dir, capsys):
    tokens = CodeCache.open(cache_dir).tokens
    threes = int((np.asarray(tokens) == 3).sum())
    result = json.loads(run_cli(capsys, "search", str(cache_dir), "--token-id", "3", "--json"))
    assert result["query"] == {"tokens": [3], "hook": None}
    matches = result["matches"]
    assert matches[0] == {
        "hook": "hook_embed",
        "group": 0,
        "code": 3,
        "precision": 1.0,
        "recall": 1.0,
        "f1": 1.0,
        "count": threes,
        "true_positives": threes,
    }
    f1 = [m["f1"] for m in matches]
    assert f1 == sorted(f1, reverse=True) and len(matches) > 1
    assert {m["hook"] for m in matches} > {"hook_embed"}  # every codebook is searched
    by_string = json.loads(run_cli(capsys, "search", str(cache_dir), "--token", "3", "--json"))
    assert by_string["matches"] == matches


def test_search_by_regex_labels_the_captured_token(cache_dir, capsys):
    tokens = np.asarray(CodeCache.open(cache_dir).tokens)
    threes = int((tokens == 3).sum())
    # "(3)4": the 3s followed by a 4 in the same row (the 3 at a row's end is not)
    followed = int(((tokens[:, :-1] == 3) & (tokens[:, 1:] == 4)).sum())
    assert 0 < followed < threes
    argv = ["search", str(cache_dir), "--regex", "(3)4", "--hook", "hook_embed", "--json"]
    best = json.loads(run_cli(capsys, *argv))["matches"][0]
    assert (best["code"], best["count"], best["true_positives"]) == (3, threes, followed)
    assert best["precision"] == pytest.approx(followed / threes) and best["recall"] == 1.0


def test_search_table_is_readable(cache_dir, capsys):
    argv = ["search", str(cache_dir), "--token-id", "3", "--hook", "hook_embed", "--top", "2"]
    lines = run_cli(capsys, *argv).splitlines()
    assert lines[0].split() == ["hook", "group", "code", "precision", "recall", "F1", "count", "TP"]
    threes = int((np.asarray(CodeCache.open(cache_dir).tokens) == 3).sum())
    assert (
        lines[1].split() == ["hook_embed", "0", "3", "1.000", "1.000", "1.000"] + [str(threes)] * 2
    )
    assert len(lines) == 2  # one token -> one embedding code fires on it


def test_search_code_shows_where_it_fires(cache_dir, capsys):
    argv = ["search", str(cache_dir), "--code", "3", "--hook", "hook_embed", "--top", "4"]
    result = json.loads(run_cli(capsys, *argv, "--window", "2", "--json"))
    assert result["count"] == int((np.asarray(CodeCache.open(cache_dir).tokens) == 3).sum())
    assert len(result["contexts"]) == 4
    for context in result["contexts"]:
        assert context["token_ids"][context["center"]] == 3
        assert context["tokens"][context["center"]] == "3"
    table = run_cli(capsys, *argv).splitlines()
    assert table[0] == f"hook_embed group 0 code 3: fires on {result['count']} tokens"
    assert table[1].split() == ["seq", "pos", "context"] and "[[3]]" in table[2]


def test_dashboard_with_the_model_dir(cache_dir, workspace, capsys):
    site = workspace["root"] / "site"
    argv = ["dashboard", str(cache_dir), "--out", str(site), "--model-dir", str(workspace["run"])]
    printed = json.loads(run_cli(capsys, *argv))
    assert printed["dashboard"] == str(site / "index.html") and (site / "index.html").is_file()
    files = [p for p in site.rglob("*") if p.is_file()]
    assert (printed["bytes"], printed["files"]) == (
        sum(p.stat().st_size for p in files),
        len(files),
    )
    # a second write needs --overwrite; a directory of other files is never replaced
    assert "pass --overwrite" in one_line_error(capsys, *argv)
    run_cli(capsys, *argv, "--overwrite")
    mine = workspace["root"] / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    err = one_line_error(capsys, "dashboard", str(cache_dir), "--out", str(mine), "--overwrite")
    assert "holds other files" in err and (mine / "notes.txt").read_text() == "keep"


# -- one-line errors ---------------------------------------------------------------------------


def test_unknown_hook_lists_the_cache_hooks(cache_dir, capsys):
    argv = [str(cache_dir), "--token-id", "3", "--hook", "blocks.0.hook_mlp_out"]
    err = one_line_error(capsys, "search", *argv)
    assert "no codebook at 'blocks.0.hook_mlp_out'" in err and "hook_embed" in err
    err = one_line_error(capsys, "search", str(cache_dir), "--code", "1")
    assert "--code needs --hook" in err and "blocks.1.hook_mlp_out" in err


def test_code_or_token_out_of_range(cache_dir, capsys):
    err = one_line_error(capsys, "search", str(cache_dir), "--code", "11", "--hook", "hook_embed")
    assert "code 11 is out of range" in err and "0..10" in err
    err = one_line_error(capsys, "search", str(cache_dir), "--token-id", "99")
    assert "[0, 10]" in err
    err = one_line_error(capsys, "search", str(cache_dir), "--token", "33")
    assert "'33' is not a token of the cache's vocabulary" in err


def test_regex_that_does_not_compile(cache_dir, capsys):
    err = one_line_error(capsys, "search", str(cache_dir), "--regex", "(3")
    assert "regex '(3' does not compile" in err


def test_cache_built_for_another_model(cache_dir, workspace, capsys):
    """A run with the same codebooks on a model of other weights (seed 1) is another model."""
    other = workspace["root"] / "other-run"
    shutil.copytree(workspace["run"] / "codebooks", other / "codebooks")
    seed1 = write_model_json(workspace["root"] / "seed1.json", workspace["cfg"], seed=1)
    (other / "summary.json").write_text(json.dumps({"model": {"model": str(seed1)}}))
    site = workspace["root"] / "other-site"
    err = one_line_error(
        capsys, "dashboard", str(cache_dir), "--out", str(site), "--model-dir", str(other)
    )
    assert "was built for the model" in err and not site.exists()


def test_empty_corpus(workspace, capsys):
    empty = workspace["root"] / "empty.jsonl"
    empty.write_text("")
    out = workspace["root"] / "never"
    run = str(workspace["run"])
    err = one_line_error(capsys, "cache", run, "--data", str(empty), "--out", str(out))
    assert "is empty" in err
    short = workspace["root"] / "short.jsonl"
    short.write_text(json.dumps({"tokens": [1, 2, 3]}) + "\n")
    err = one_line_error(capsys, "cache", run, "--data", str(short), "--out", str(out))
    assert (
        err.startswith("tl-codebook cache: error: nothing to cache: ") and "of 32 tokens" in err
    )  # n_ctx
    assert not out.exists()


def test_truncated_cache_file(cache_dir, workspace, capsys):
    broken = workspace["root"] / "broken-cache"
    shutil.copytree(cache_dir, broken)
    codes = next((broken / "codes").glob("*.npy"))
    codes.write_bytes(codes.read_bytes()[:200])
    err = one_line_error(capsys, "search", str(broken), "--token-id", "3")
    assert "truncated or damaged" in err and codes.name in err


def test_bad_model_dirs_and_outputs(cache_dir, workspace, capsys):
    root, run, data = workspace["root"], str(workspace["run"]), str(workspace["data"])
    err = one_line_error(capsys, "cache", str(root), "--data", data, "--out", str(root / "x"))
    assert "neither a `tl-codebook train` run" in err
    err = one_line_error(capsys, "cache", run, "--out", str(root / "x"))
    assert "--data is needed" in err
    err = one_line_error(capsys, "cache", run, "--data", data, "--out", str(cache_dir))
    assert "already holds a code cache; pass --overwrite" in err
    err = one_line_error(
        capsys, "cache", run, "--data", data, "--out", str(root / "x"), "--seq-len", "33"
    )
    assert "longer than the model's context (n_ctx 32)" in err
    err = one_line_error(
        capsys, "cache", run, "--data", data, "--out", str(root / "x"), "--hooks", "hook_embd"
    )
    assert "'hook_embd' is not a codebook of the model" in err
    bare = root / "bare-run"
    shutil.copytree(workspace["run"] / "codebooks", bare / "codebooks")
    err = one_line_error(capsys, "cache", str(bare), "--data", data, "--out", str(root / "x"))
    assert "does not record the model" in err and "pass --model" in err
    unseeded = write_model_json(root / "unseeded.json", workspace["cfg"], seed=None)
    argv = [str(bare), "--model", str(unseeded), "--data", data, "--out", str(root / "x")]
    assert "has no seed and the run saved no model weights" in one_line_error(
        capsys, "cache", *argv
    )
    assert not (root / "x").exists()
