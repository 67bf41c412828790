"""An offline code browser: a static site, written from a `CodeCache`, that a user opens straight
from disk (`file://`) to look through every codebook's codes.

Browsers refuse `fetch` of local files, so data ships as small script files that call
`window.TLCB.register(key, data)` and are inserted as `<script>` tags only when a page needs them:
the index holds a few numbers per codebook, each block of `BLOCK_SIZE` codes is one file, and the
token search reads one file per block of token ids. Nothing on the site asks for the network (a
Content-Security-Policy forbids it) and the page builds its DOM with `textContent`, so a token whose
text is HTML stays text. The JSON inside each script file escapes `<`, `>`, `&`, U+2028 and U+2029,
so no data can end the script early.

Layout (all under `out_dir`, built under a temporary name and swapped in whole)::

    index.html  assets/{app.js,style.css}
    data/index.js                          codebooks, density histograms, dead codes, steering
    data/codes/<file_id>/g<group>/b<block>.js   per-code contexts, co-firing, logit effects, concepts
    data/vocab.js                          [token id, text, count] of every token in the corpus
    data/tokens/b<block>.js                per token id: the codes that fire on it (precision, recall)
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jaxtyping import Int
from transformer_lens import HookedTransformer

from tl_codebook.analysis.concepts import ConceptScores, code_concept_precision_recall
from tl_codebook.files import atomic_directory, check_safe_name, json_ready

BLOCK_SIZE = 64
"""Codes per data file: one code page loads one file of this many codes."""
TOKEN_BLOCK_SIZE = 256
"""Token ids per token-search file."""
N_CONTEXTS = 20
"""Top contexts shipped per code (the cap that keeps a block file small)."""
WINDOW = 8
"""Tokens shown on each side of the firing token."""
N_TOP = 10
"""Co-firing codes, similar codes, logit effects and labels shown per code; codes per token."""
HISTOGRAM_BINS = 24
ASSETS = ("index.html", "app.js", "style.css")
_CHUNK_TOKENS = 1 << 20
_MAX_COUNTS = 1 << 22


def script_json(data: Any) -> str:
    """JSON that is safe inside a `<script>` element and a JavaScript string: `<`, `>` and `&`
    (so no `</script>` or `<!--` appears) and U+2028/U+2029 (line terminators in old JS) are
    written as `\\uXXXX` escapes, which JSON and JavaScript both read back as the same text."""
    text = json.dumps(json_ready(data, digits=6), ensure_ascii=False, allow_nan=False)
    for char in ("<", ">", "&", "\u2028", "\u2029"):
        text = text.replace(char, f"\\u{ord(char):04x}")
    return text


def _register_script(key: str, data: Any) -> str:
    return f"window.TLCB.register({json.dumps(key)}, {script_json(data)});\n"


def _hook_file_ids(cache: Any) -> dict[str, str]:
    """Hook name -> the cache's safe `file_id` (hook names contain dots and never become paths)."""
    ids = {entry["name"]: entry["file_id"] for entry in cache.manifest["hooks"]}
    return {hook: check_safe_name(ids[hook], "cache file id") for hook in cache.hooks}


def _label_inputs(labels: Any, n_seq: int, seq_len: int) -> tuple[np.ndarray, list[str]] | None:
    """`labels` as (ids [n_tokens] int64 with -1 for none, names); accepts ids or (ids, names)."""
    if labels is None:
        return None
    names: Sequence[str] | None = None
    if isinstance(labels, tuple) and len(labels) == 2:
        labels, names = labels
    ids = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels)
    if ids.shape != (n_seq, seq_len) or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(
            f"labels must be integers of shape (n_seq, seq_len) = {(n_seq, seq_len)} with -1 for "
            f"unlabelled tokens, got {ids.dtype} of shape {tuple(ids.shape)}."
        )
    ids = ids.reshape(-1).astype(np.int64)
    num_labels = int(ids.max()) + 1 if ids.size and ids.max() >= 0 else 0
    if names is None:
        names = [f"label {i}" for i in range(num_labels)]
    names = [str(name) for name in names]
    if len(names) < num_labels:
        raise ValueError(
            f"labels go up to {num_labels - 1} but only {len(names)} label names were given."
        )
    return ids, names


def _flat_codes(cache: Any, hook: str, start: int, stop: int) -> torch.Tensor:
    """Code ids of flat tokens [start, stop) as int64 [tokens, n_groups, k] (one chunk in RAM)."""
    codes = cache.codes(hook)
    n_groups, k = codes.shape[2], codes.shape[3]
    flat = codes.reshape(-1, n_groups, k)
    return torch.from_numpy(np.asarray(flat[start:stop], dtype=np.int64))


def _label_scores(
    cache: Any, hook: str, label_ids: np.ndarray, num_labels: int, num_codes: int
) -> ConceptScores:
    """Precision/recall of every code of `hook` for every label, summed over token chunks."""
    total: ConceptScores | None = None
    for start in range(0, cache.n_tokens, _CHUNK_TOKENS):
        stop = min(start + _CHUNK_TOKENS, cache.n_tokens)
        part = code_concept_precision_recall(
            _flat_codes(cache, hook, start, stop),
            torch.from_numpy(label_ids[start:stop]),
            num_codes,
            num_labels,
        )
        total = part if total is None else total + part
    assert total is not None
    return total


def _token_codes(cache: Any, hooks: dict[str, str]) -> dict[int, list[list[Any]]]:
    """For every token id in the corpus, its best codes over all codebooks: the codes whose
    firings best match "this token" by F1 (precision = P(token | code), recall = P(code | token)).

    Tokens are the labels of the one precision/recall counter, in chunks of label ids small
    enough that no chunk holds more than `_MAX_COUNTS` counts; precision divides by the code's
    firings over the whole corpus (the index's counts), not only over the chunk's tokens.
    """
    flat_tokens = np.asarray(cache.tokens).reshape(-1).astype(np.int64)
    present, compact = np.unique(flat_tokens, return_inverse=True)
    compact = compact.reshape(-1)
    candidates: dict[int, list[list[Any]]] = {int(t): [] for t in present}
    for hook, file_id in hooks.items():
        n_groups, _, num_codes = cache.shape_of(hook)
        code_counts = torch.from_numpy(np.asarray(cache.index(hook).counts(), dtype=np.int64))
        step = max(1, _MAX_COUNTS // (n_groups * num_codes))
        for first in range(0, len(present), step):
            last = min(first + step, len(present))
            labels = np.where((compact >= first) & (compact < last), compact - first, -1)
            joint = None
            label_counts = None
            for start in range(0, cache.n_tokens, _CHUNK_TOKENS):
                stop = min(start + _CHUNK_TOKENS, cache.n_tokens)
                part = code_concept_precision_recall(
                    _flat_codes(cache, hook, start, stop),
                    torch.from_numpy(labels[start:stop]),
                    num_codes,
                    last - first,
                )
                joint = part.joint_counts if joint is None else joint + part.joint_counts
                label_counts = (
                    part.label_counts if label_counts is None else label_counts + part.label_counts
                )
            assert joint is not None and label_counts is not None
            scores = ConceptScores.from_counts(joint, code_counts, label_counts)
            f1 = scores.f1().reshape(n_groups * num_codes, last - first)
            best_f1, best = f1.topk(min(N_TOP, f1.shape[0]), dim=0)
            for column in range(last - first):
                rows = candidates[int(present[first + column])]
                for value, unit in zip(best_f1[:, column].tolist(), best[:, column].tolist()):
                    if value <= 0:
                        break
                    group, code = divmod(unit, num_codes)
                    rows.append(
                        [
                            file_id,
                            group,
                            code,
                            float(scores.precision[group, code, column]),
                            float(scores.recall[group, code, column]),
                            int(scores.joint_counts[group, code, column]),
                            value,
                        ]
                    )
    for rows in candidates.values():
        rows.sort(key=lambda row: (-row[6], -row[5]))
        del rows[N_TOP:]
    return candidates


def _histogram(counts: np.ndarray, n_tokens: int) -> dict[str, Any]:
    """Histogram of log10(firing frequency) over the live codes (dead codes are counted apart)."""
    alive = counts[counts > 0]
    if alive.size == 0:
        return {"edges": [], "counts": []}
    log_freq = np.log10(alive / max(n_tokens, 1))
    low, high = float(log_freq.min()), float(log_freq.max())
    if high - low < 1e-9:
        low, high = low - 0.5, high + 0.5
    hist, edges = np.histogram(log_freq, bins=HISTOGRAM_BINS, range=(low, high))
    return {"edges": edges.tolist(), "counts": hist.tolist()}


def _context_row(context: Any, block_vocab: dict[int, str], vocab: Sequence[str]) -> dict:
    ids = [int(t) for t in context.token_ids]
    for token in ids:
        block_vocab.setdefault(token, vocab[token] if token < len(vocab) else str(token))
    score = getattr(context, "score", None)
    return {
        "s": int(context.seq),
        "p": int(context.pos),
        "t": ids,
        "c": int(context.center),
        "sc": None if score is None else float(score),
    }


def _rows(items: Any, fields: Sequence[str]) -> list[Any]:
    """Dataclass-like results (or tuples) as plain lists of `fields`, for the JSON."""
    out = []
    for item in items:
        if isinstance(item, (tuple, list)):
            out.append(list(item))
        else:
            out.append([getattr(item, field) for field in fields])
    return out


def write_dashboard(
    cache: Any,
    out_dir: str | Path,
    model: HookedTransformer | None = None,
    labels: Int[torch.Tensor, "..."] | tuple[Int[torch.Tensor, "..."], Sequence[str]] | None = None,
    steering: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None = None,
    top_codes: int | None = None,
    detail: Mapping[str, Sequence[tuple[int, int]]] | None = None,
) -> Path:
    """Write the code browser for `cache` into `out_dir` (replaced whole); returns its index.html.

    The site is static and self-contained: open `index.html` from disk, no server needed.

    Args:
        cache: the `CodeCache` to browse.
        out_dir: the directory to write (built under a temporary name, swapped in whole).
        model: the model the cache was built from; adds each code's logit effects (top and
            bottom tokens of the code vector carried to the unembedding) and its most similar
            codes.
        labels: concept labels per token, integer ids of shape (n_seq, seq_len) with -1 for
            none, optionally as `(ids, names)`; adds each code's precision/recall for its
            best-matching labels.
        steering: results of switching codes on, shown as a table on the index: a mapping of
            condition -> value or -> dict of columns, or a list of row dicts.
        top_codes: detail (contexts, co-firing, effects) only for the `top_codes` most frequent
            codes of each codebook group, to keep a very large site quick to write; None details
            every live code. Every code still gets its count and density.
        detail: `{hook: [(group, code), ...]}`, codes to detail as well as the `top_codes`
            most frequent (the codes an experiment reports, so each one the report names can be
            opened in the browser); a code that never fired has nothing to detail.

    Returns:
        The path of the site's `index.html`.

    Raises:
        ValueError: for `top_codes` that is not a positive integer, labels that are not integers
            of shape (n_seq, seq_len) or have fewer names than label ids, or a model lacking a
            codebook at one of the cache's hooks.
        TypeError: for `steering` that is neither a mapping nor a list of row dicts.
    """
    if top_codes is not None and (not isinstance(top_codes, int) or top_codes < 1):
        raise ValueError(f"top_codes must be a positive integer or None, got {top_codes!r}.")
    hooks = _hook_file_ids(cache)
    vocab = list(cache.vocab)
    n_tokens = int(cache.n_tokens)
    label_inputs = _label_inputs(labels, int(cache.n_seq), int(cache.seq_len))
    codebooks = _model_codebooks(cache, model)
    steering_rows = _steering_table(steering)
    out_dir = Path(out_dir)
    with atomic_directory(out_dir) as site:
        (site / "assets").mkdir()
        assets = resources.files("tl_codebook.analysis") / "dashboard_assets"
        for name in ASSETS:
            target = site / name if name == "index.html" else site / "assets" / name
            with resources.as_file(assets / name) as source:
                shutil.copyfile(source, target)
        index_hooks = []
        for hook, file_id in hooks.items():
            index_hooks.append(
                _write_codebook(
                    cache, site, hook, file_id, hooks, vocab, model, codebooks, label_inputs,
                    top_codes, (detail or {}).get(hook, ()),
                )
            )  # fmt: skip
        token_codes = _token_codes(cache, hooks)
        flat_tokens = np.asarray(cache.tokens).reshape(-1)
        token_counts = np.bincount(flat_tokens.astype(np.int64), minlength=1)
        _write_script(
            site / "data" / "vocab.js",
            "vocab",
            [[t, _token_text(vocab, t), int(token_counts[t])] for t in sorted(token_codes)],
        )
        blocks: dict[int, dict[int, list]] = {}
        for token, rows in token_codes.items():
            blocks.setdefault(token // TOKEN_BLOCK_SIZE, {})[token] = rows
        for block, rows_by_token in blocks.items():
            _write_script(
                site / "data" / "tokens" / f"b{block:04d}.js", f"tokens/b{block:04d}", rows_by_token
            )
        _write_script(
            site / "data" / "index.js",
            "index",
            {
                "title": str(cache.manifest.get("model_name") or "codebook model"),
                "n_tokens": n_tokens,
                "n_seq": int(cache.n_seq),
                "seq_len": int(cache.seq_len),
                "block_size": BLOCK_SIZE,
                "token_block_size": TOKEN_BLOCK_SIZE,
                "hooks": index_hooks,
                "labels": None if label_inputs is None else label_inputs[1],
                "has_model": model is not None,
                "steering": steering_rows,
            },
        )
    return out_dir / "index.html"


def _token_text(vocab: Sequence[str], token: int) -> str:
    return vocab[token] if 0 <= token < len(vocab) else str(token)


def _write_script(path: Path, key: str, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(_register_script(key, data), encoding="utf-8")


def _model_codebooks(cache: Any, model: HookedTransformer | None) -> dict[str, Any]:
    """The model's codebooks for the cache's hooks (checked to be the ones the cache holds)."""
    if model is None:
        return {}
    from tl_codebook.hooks.model import codebooks_of

    present = codebooks_of(model)
    missing = [hook for hook in cache.hooks if hook not in present]
    if missing:
        raise ValueError(
            f"the model has no codebook at {missing} (the cache's hooks); it has {sorted(present)}. "
            "Pass the model the cache was built from."
        )
    return {hook: present[hook] for hook in cache.hooks}


def _steering_table(steering: Any) -> dict[str, Any] | None:
    """Steering results as {columns, rows} of strings and numbers."""
    if steering is None:
        return None
    if isinstance(steering, Mapping):
        items = list(steering.items())
        if all(isinstance(value, Mapping) for _, value in items):
            rows = [{"condition": key, **dict(value)} for key, value in items]
        else:
            rows = [{"condition": key, "value": value} for key, value in items]
    elif isinstance(steering, Sequence) and all(isinstance(row, Mapping) for row in steering):
        rows = [dict(row) for row in steering]
    else:
        raise TypeError(
            "steering must be a mapping (condition -> value or dict of columns) or a list of "
            f"row dicts, got {type(steering).__name__}."
        )
    columns: list[str] = []
    for row in rows:
        columns.extend(str(key) for key in row if str(key) not in columns)
    cells = [[_cell(row.get(column)) for column in columns] for row in rows]
    return {"columns": columns, "rows": cells}


def _cell(value: Any) -> Any:
    value = json_ready(value, digits=4)
    return value if isinstance(value, (int, float, str)) or value is None else json.dumps(value)


def _write_codebook(
    cache: Any,
    site: Path,
    hook: str,
    file_id: str,
    hooks: dict[str, str],
    vocab: Sequence[str],
    model: HookedTransformer | None,
    codebooks: dict[str, Any],
    label_inputs: tuple[np.ndarray, list[str]] | None,
    top_codes: int | None,
    extra: Sequence[tuple[int, int]] = (),
) -> dict[str, Any]:
    """Write every block file of one codebook; returns its entry in the index."""
    n_groups, k, num_codes = cache.shape_of(hook)
    counts = np.asarray(cache.index(hook).counts(), dtype=np.int64).reshape(n_groups, num_codes)
    n_tokens = max(int(cache.n_tokens), 1)
    label_scores = None
    if label_inputs is not None and label_inputs[1]:
        scores = _label_scores(cache, hook, label_inputs[0], len(label_inputs[1]), num_codes)
        # F1 of every (group, code, label) once per codebook, not once per detailed code.
        label_scores = (scores, scores.f1())
    groups = []
    for group in range(n_groups):
        order = np.argsort(-counts[group], kind="stable")
        live = order[counts[group][order] > 0]
        detailed = set((live if top_codes is None else live[:top_codes]).tolist())
        detailed |= {int(c) for g, c in extra if int(g) == group and counts[group, int(c)] > 0}
        for block in range((num_codes + BLOCK_SIZE - 1) // BLOCK_SIZE):
            block_vocab: dict[int, str] = {}
            entries = {}
            for code in range(block * BLOCK_SIZE, min((block + 1) * BLOCK_SIZE, num_codes)):
                entry: dict[str, Any] = {"n": int(counts[group, code])}
                if code in detailed:
                    entry.update(
                        _code_details(
                            cache, hook, group, code, hooks, vocab, block_vocab, model,
                            codebooks, label_scores,
                        )
                    )  # fmt: skip
                entries[code] = entry
            key = f"codes/{file_id}/g{group}/b{block:04d}"
            _write_script(
                site / "data" / f"{key}.js",
                key,
                {"codes": entries, "vocab": {str(t): s for t, s in block_vocab.items()}},
            )
        groups.append(
            {
                "dead": int((counts[group] == 0).sum()),
                "histogram": _histogram(counts[group], n_tokens),
                "top": [[int(c), int(counts[group, c])] for c in live[:N_TOP]],
                "detailed": len(detailed),
            }
        )
    return {
        "id": file_id,
        "name": hook,
        "n_groups": n_groups,
        "k": k,
        "num_codes": num_codes,
        "groups": groups,
    }


def _code_details(
    cache: Any,
    hook: str,
    group: int,
    code: int,
    hooks: dict[str, str],
    vocab: Sequence[str],
    block_vocab: dict[int, str],
    model: HookedTransformer | None,
    codebooks: dict[str, Any],
    label_scores: tuple[ConceptScores, torch.Tensor] | None,
) -> dict[str, Any]:
    """One live code's detail: top contexts, co-firing codes, logit effects and similar codes
    (with a model), and its best labels (`label_scores`: the codebook's scores and their F1)."""
    contexts = cache.top_contexts(hook, code, group=group, n=N_CONTEXTS, window=WINDOW)
    details: dict[str, Any] = {"ctx": [_context_row(c, block_vocab, vocab) for c in contexts]}
    cofiring = _rows(
        cache.cofiring(hook, code, group=group, top=N_TOP + 1), ("hook", "group", "code", "jaccard")
    )
    details["co"] = [
        [hooks.get(row[0], row[0]), int(row[1]), int(row[2]), float(row[3])]
        for row in cofiring
        if not (row[0] == hook and int(row[1]) == group and int(row[2]) == code)
    ][:N_TOP]
    if model is not None:
        from tl_codebook.analysis.effects import logit_effects, similar_codes

        top, bottom = logit_effects(model, hook, code, group=group, top=N_TOP)
        effects = []
        for token, value in list(top) + list(bottom):
            block_vocab.setdefault(int(token), _token_text(vocab, int(token)))
            effects.append([int(token), float(value)])
        details["lo"] = {"top": effects[: len(top)], "bottom": effects[len(top) :]}
        similar = _rows(
            similar_codes(codebooks[hook], code, group=group, top=N_TOP), ("code", "similarity")
        )
        details["sim"] = [[int(row[0]), float(row[1])] for row in similar]
    if label_scores is not None:
        scores, codebook_f1 = label_scores
        f1 = codebook_f1[group, code]
        best = f1.argsort(descending=True)[:N_TOP].tolist()
        details["pr"] = [
            [
                label,
                float(scores.precision[group, code, label]),
                float(scores.recall[group, code, label]),
                float(f1[label]),
            ]
            for label in best
            if scores.joint_counts[group, code, label] > 0
        ]
    return details
