"""The code browser's files: what `write_dashboard` writes, how big, and how data is escaped.

Known-answer cache: a codebook whose first 11 codes are the model's own embedding rows at
`hook_embed` (cosine similarity) maps token t to code t; the other codes never fire.
"""

import json
import re

import pytest
import torch

from tl_codebook.analysis.cache import CodeCache
from tl_codebook.analysis.dashboard import (
    BLOCK_SIZE,
    N_CONTEXTS,
    WINDOW,
    script_json,
    write_dashboard,
)
from tl_codebook.codebook import Codebook, CodebookConfig
from tl_codebook.hooks.model import HookedCodebookTransformer

PAYLOADS = ["<img src=x onerror=window.__pwned=1>", "</script><script>window.__pwned=2</script>"]
VOCAB = [
    "t0",
    "t1",
    "t2",
    PAYLOADS[0],
    PAYLOADS[1],
    "a&b\u2028c\u2029",
    "t6",
    "t7",
    "t8",
    "t9",
    "t10",
]
NUM_CODES = 11 + 2 * BLOCK_SIZE  # three blocks; codes 11.. are far from every embedding row


@pytest.fixture(scope="module")
def built(tmp_path_factory, make_tiny_cfg):
    model = HookedCodebookTransformer(make_tiny_cfg())
    codebook = Codebook(
        CodebookConfig(d_in=16, num_codes=NUM_CODES, similarity="cosine", hook_name="hook_embed")
    )
    with torch.no_grad():
        codebook.codes[0, :11] = model.W_E
        codebook.codes[0, 11:] = -100 * model.W_E.sum(0)  # one direction no token points to
    model.add_codebook(codebook)
    tokens = torch.randint(0, 11, (16, 32), generator=torch.Generator().manual_seed(0))
    root = tmp_path_factory.mktemp("dashboard")
    cache = CodeCache.build(model, tokens, root / "cache", vocab=VOCAB, progress=False)
    labels = torch.where(tokens == 7, 0, torch.where(tokens == 8, 1, -1))
    steering = {"force code 7": {"accuracy": 0.75, "note": PAYLOADS[1]}}
    index = write_dashboard(
        cache,
        root / "site",
        model=model,
        labels=(labels, ["seven", PAYLOADS[0]]),
        steering=steering,
    )
    return index, cache, tokens


def read_data(path):
    """The key and the data a site script file registers."""
    text = path.read_text(encoding="utf-8")
    match = re.fullmatch(r'window\.TLCB\.register\(("[^"]*"), (.*)\);\n', text, re.S)
    assert match, text[:200]
    return json.loads(match.group(1)), json.loads(match.group(2))


def test_site_files_are_written_one_file_per_block(built):
    index, cache, _ = built
    file_id = cache.manifest["hooks"][0]["file_id"]
    site = index.parent
    assert index.name == "index.html" and index.is_file()
    assert (site / "assets" / "app.js").is_file() and (site / "assets" / "style.css").is_file()
    blocks = sorted(p.name for p in (site / "data" / "codes" / file_id / "g0").iterdir())
    assert blocks == ["b0000.js", "b0001.js", "b0002.js"]
    key, data = read_data(site / "data" / "codes" / file_id / "g0" / "b0001.js")
    assert key == f"codes/{file_id}/g0/b0001"
    assert sorted(map(int, data["codes"])) == list(range(BLOCK_SIZE, 2 * BLOCK_SIZE))
    assert not list(site.parent.glob(".tmp-*"))  # built under a temporary name, swapped in


def test_index_counts_dead_codes_and_each_code_page_has_its_known_answers(built):
    index, cache, tokens = built
    file_id = cache.manifest["hooks"][0]["file_id"]
    _, data = read_data(index.parent / "data" / "index.js")
    (hook,) = data["hooks"]
    assert hook["name"] == "hook_embed" and hook["num_codes"] == NUM_CODES
    assert hook["groups"][0]["dead"] == NUM_CODES - 11
    assert sum(hook["groups"][0]["histogram"]["counts"]) == 11
    assert data["steering"]["columns"] == ["condition", "accuracy", "note"]
    _, block = read_data(index.parent / "data" / "codes" / file_id / "g0" / "b0000.js")
    seven = block["codes"]["7"]
    assert seven["n"] == int((tokens == 7).sum())
    assert [c["t"][c["c"]] for c in seven["ctx"]] == [7] * N_CONTEXTS
    assert all(len(c["t"]) <= 2 * WINDOW + 1 for c in seven["ctx"])
    assert seven["pr"][0][:3] == [0, 1.0, 1.0]  # label "seven": precision and recall 1
    assert len(seven["lo"]["top"]) == 10 and block["codes"]["20"] == {"n": 0}


def test_token_search_data_maps_each_token_to_its_code(built):
    index, cache, _ = built
    file_id = cache.manifest["hooks"][0]["file_id"]
    _, vocab = read_data(index.parent / "data" / "vocab.js")
    assert [row[1] for row in vocab] == VOCAB
    _, tokens = read_data(index.parent / "data" / "tokens" / "b0000.js")
    for token in range(11):
        assert tokens[str(token)][0][:6] == [file_id, 0, token, 1.0, 1.0, vocab[token][2]]


def test_block_files_stay_small(built):
    index, _, _ = built
    sizes = [p.stat().st_size for p in (index.parent / "data").rglob("*.js")]
    assert max(sizes) < 64 * 1024  # 64 codes x 20 contexts x 17 tokens, plus effects


def test_payloads_are_escaped_in_every_data_file(built):
    index, _, _ = built
    files = list((index.parent / "data").rglob("*.js"))
    for path in files:
        body = path.read_text(encoding="utf-8").split(", ", 1)[1]
        for char in "<>&\u2028\u2029":
            assert char not in body, (path, char)
    _, vocab = read_data(index.parent / "data" / "vocab.js")
    assert vocab[3][1] == PAYLOADS[0] and vocab[5][1] == "a&b\u2028c\u2029"  # read back intact


def test_script_json_escapes_what_could_end_a_script():
    text = script_json({"a": "</script><!--&\u2028\u2029"})
    assert text == '{"a": "\\u003c/script\\u003e\\u003c!--\\u0026\\u2028\\u2029"}'
    assert json.loads(text) == {"a": "</script><!--&\u2028\u2029"}


def test_no_site_file_names_a_network_url(built):
    index, _, _ = built
    for path in index.parent.rglob("*"):
        if path.is_file():
            assert not re.search(r"https?://|//[a-z]", path.read_text(encoding="utf-8")), path


def test_bad_arguments_get_clear_errors(built, tmp_path):
    _, cache, _ = built
    with pytest.raises(ValueError, match="top_codes must be a positive integer"):
        write_dashboard(cache, tmp_path / "site", top_codes=0)
    with pytest.raises(ValueError, match=r"labels must be integers of shape \(n_seq, seq_len\)"):
        write_dashboard(cache, tmp_path / "site", labels=torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="only 1 label names"):
        write_dashboard(
            cache, tmp_path / "site", labels=(torch.ones(16, 32, dtype=torch.long), ["a"])
        )
    assert not (tmp_path / "site").exists()


def test_top_codes_details_only_the_most_frequent_codes(built, tmp_path):
    _, cache, tokens = built
    index = write_dashboard(cache, tmp_path / "site", top_codes=2)
    file_id = cache.manifest["hooks"][0]["file_id"]
    _, block = read_data(index.parent / "data" / "codes" / file_id / "g0" / "b0000.js")
    counts = torch.bincount(tokens.flatten(), minlength=11)
    detailed = sorted(int(c) for c, e in block["codes"].items() if "ctx" in e)
    assert detailed == sorted(counts.argsort(descending=True, stable=True)[:2].tolist())
    assert all(block["codes"][str(t)]["n"] == int(counts[t]) for t in range(11))


def test_detail_adds_named_codes_to_the_most_frequent(built, tmp_path):
    _, cache, tokens = built
    counts = torch.bincount(tokens.flatten(), minlength=11)
    frequent = counts.argsort(descending=True, stable=True).tolist()
    rare, never = frequent[-2], 20  # a live code outside the top 2, and one that never fired
    assert counts[rare] > 0
    hook = cache.manifest["hooks"][0]
    index = write_dashboard(
        cache, tmp_path / "site", top_codes=2, detail={hook["name"]: [(0, rare), (0, never)]}
    )
    _, block = read_data(index.parent / "data" / "codes" / hook["file_id"] / "g0" / "b0000.js")
    detailed = sorted(int(c) for c, e in block["codes"].items() if "ctx" in e)
    assert detailed == sorted([*frequent[:2], rare])
    assert block["codes"][str(never)] == {"n": 0}
