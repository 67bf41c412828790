"""`tl-codebook cache`, `search` and `dashboard`: the code cache from the command line.

`cache` runs a trained model (a `tl-codebook train` run directory or a `tl-codebook demo` TokFSM
run) over a corpus once and writes a `CodeCache`; `search` answers "which codes fire here?" (and
"where does this code fire?") from the cache alone; `dashboard` writes the offline code browser.
Bad input is a ValueError/KeyError/OSError, which `tl-codebook` prints as one line (exit code 2).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from tl_codebook.training.cli import add_data_arguments, add_model_arguments

if TYPE_CHECKING:
    from tl_codebook.analysis.cache import CodeCache
    from tl_codebook.analysis.search import CodeMatch
    from tl_codebook.fsm.config import ExperimentConfig
    from tl_codebook.fsm.task import TokFSMTask
    from tl_codebook.hooks.model import HookedCodebookTransformer

CACHE_HELP = "Run a trained model with codebooks over a corpus once; keep its code ids on disk."
SEARCH_HELP = "Rank a code cache's codes for a token set or a regex, or show where one code fires."
DASHBOARD_HELP = "Write a code cache's offline HTML code browser (opens from disk, no server)."
DEFAULT_SEQ_LEN = 128
"""Rows of a text corpus are this long (the trainer's default), or the model's n_ctx if shorter."""
SUMMARY_FILE = "summary.json"
"""What `tl-codebook train` writes into its run directory (with the model it loaded)."""

CACHE_EXAMPLES = """examples:
  # a tl-codebook train run over a local corpus (the model is the one the run recorded)
  tl-codebook cache runs/gpt2-frozen --data corpus.jsonl --out caches/gpt2 --max-sequences 2000
  # a tl-codebook demo run: held-out TokFSM sequences of its own task, with scores
  tl-codebook cache runs/tokfsm --out caches/tokfsm --scores

MODEL_DIR: a `tl-codebook train --out` directory (codebooks/, summary.json naming the model;
--model overrides it) or a `tl-codebook demo` run (metrics.json, fsm.json, codebook_model/)."""

SEARCH_EXAMPLES = """examples:
  tl-codebook search caches/gpt2 --token " the" --token " a" --top 10
  tl-codebook search caches/gpt2 --regex "(\\d+)%" --min-precision 0.5 --json
  tl-codebook search caches/tokfsm --code 17 --hook blocks.0.hook_mlp_out   # where it fires"""


# -- model directories -------------------------------------------------------------------------


@dataclass
class ModelDir:
    """A trained model with its codebooks, loaded from a run directory, and what else it knows."""

    model: HookedCodebookTransformer
    kind: str
    """"train" (`tl-codebook train`) or "demo" (`tl-codebook demo`, TokFSM)."""
    path: Path
    default_seq_len: int
    vocab: list[str] | None = None
    """Token strings when the run defines them (TokFSM digits); None: the model's tokenizer."""
    task: TokFSMTask | None = None
    config: ExperimentConfig | None = None
    metrics: dict[str, Any] = field(default_factory=dict)


def load_model_dir(
    path: str | Path,
    model: str | None = None,
    architecture: str | None = None,
    trust_remote_code: bool = False,
    device: str | None = None,
) -> ModelDir:
    """The model of a `tl-codebook train` run (its recorded model, or `model`) with the run's
    codebooks loaded, or the fine-tuned codebook model of a `tl-codebook demo` run."""
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(
            f"MODEL_DIR {str(root)!r} is not a directory; give the --out directory of "
            "`tl-codebook train` or `tl-codebook demo`."
        )
    from tl_codebook.fsm.metrics_file import METRICS_FILE
    from tl_codebook.fsm.models import FSM_FILE

    if (root / METRICS_FILE).is_file() and (root / FSM_FILE).is_file():
        if model is not None or architecture is not None:
            raise ValueError(
                f"{str(root)!r} is a TokFSM demo run, which holds its own model; --model and "
                "--architecture are for `tl-codebook train` runs."
            )
        return _load_demo_run(root, device or "cpu")
    return _load_train_run(root, model, architecture, trust_remote_code, device)


def _load_demo_run(root: Path, device: str) -> ModelDir:
    from tl_codebook.fsm.config import ExperimentConfig
    from tl_codebook.fsm.experiment import tokfsm_vocab
    from tl_codebook.fsm.metrics_file import read_metrics
    from tl_codebook.fsm.models import CODEBOOK_MODEL_DIR, load_run
    from tl_codebook.fsm.task import TokFSMTask
    from tl_codebook.io import SET_CFG

    if not (root / CODEBOOK_MODEL_DIR / SET_CFG).is_file():
        raise ValueError(
            f"the TokFSM demo run {str(root)!r} has no codebook model yet ({CODEBOOK_MODEL_DIR}/ "
            f"is missing): finish it first (tl-codebook demo --resume --out {root})."
        )
    metrics = read_metrics(root)
    config = ExperimentConfig.from_dict(metrics.get("config", {}))
    fsm, _, model = load_run(root, device=device)
    return ModelDir(
        model=model,
        kind="demo",
        path=root,
        default_seq_len=config.seq_len,
        vocab=tokfsm_vocab(fsm),
        task=TokFSMTask(fsm, config.seq_len),
        config=config,
        metrics=metrics,
    )


def _load_train_run(
    root: Path,
    model: str | None,
    architecture: str | None,
    trust_remote_code: bool,
    device: str | None,
) -> ModelDir:
    from tl_codebook.io import SET_CFG, load_model

    if (root / "codebooks" / SET_CFG).is_file():
        codebooks, run = root / "codebooks", root
    elif (root / SET_CFG).is_file():  # the codebooks/ directory itself
        codebooks, run = root, root.parent
    else:
        raise ValueError(
            f"{str(root)!r} is neither a `tl-codebook train` run (codebooks/{SET_CFG}) nor a "
            "`tl-codebook demo` run (metrics.json, fsm.json); give the --out directory of one."
        )
    if model is None:
        spec = _recorded_model(run)
        if spec is None:
            raise ValueError(
                f"{str(run)!r} does not record the model it trained on (no 'model' in "
                f"{SUMMARY_FILE}); pass --model (and --architecture) as given to tl-codebook train."
            )
        model = spec["model"]
        architecture = architecture if architecture is not None else spec.get("architecture")
    assert model is not None
    _check_weights_reproducible(model, codebooks)
    loaded = load_model(
        model, device=device, architecture=architecture, trust_remote_code=trust_remote_code
    )
    loaded.load_codebooks(codebooks)
    loaded.eval()
    n_ctx = int(loaded.cfg.n_ctx)
    return ModelDir(
        model=loaded, kind="train", path=root, default_seq_len=min(DEFAULT_SEQ_LEN, n_ctx)
    )


def _recorded_model(run: Path) -> dict[str, Any] | None:
    path = run / SUMMARY_FILE
    if not path.is_file():
        return None
    try:
        spec = json.loads(path.read_text()).get("model")
    except (ValueError, AttributeError) as err:
        raise ValueError(f"{str(path)!r} is not a readable run summary: {err}") from None
    if spec is None:
        return None
    if not isinstance(spec, dict) or not isinstance(spec.get("model"), str):
        raise ValueError(f"{str(path)!r}: 'model' must be {{\"model\": str, ...}}, got {spec!r}.")
    return spec


def _check_weights_reproducible(model: str, codebooks: Path) -> None:
    """A frozen run on a config .json without a seed trained on weights drawn at random: loading
    the config again would draw other weights, and the codes would describe nothing."""
    from tl_codebook.io import SET_CFG

    if not model.endswith(".json") or not Path(model).is_file():
        return
    saved = json.loads((codebooks / SET_CFG).read_text())
    try:
        seed = json.loads(Path(model).read_text()).get("seed")
    except (ValueError, AttributeError):
        return  # load_model reports an unreadable config
    if seed is None and not saved.get("model_weights"):
        raise ValueError(
            f"the model config {model!r} has no seed and the run saved no model weights, so its "
            "weights were drawn at random and cannot be drawn again: the codebooks fit no model "
            "that can be loaded. Train with a seed in the config (or in joint mode)."
        )


# -- tl-codebook cache -------------------------------------------------------------------------


def add_cache_command(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = CACHE_EXAMPLES
    parser.add_argument("model_dir", metavar="MODEL_DIR", help="a train or demo run directory")
    parser.add_argument("--out", required=True, help="the cache directory to write")
    data = parser.add_argument_group(
        "data (as `tl-codebook train` reads it; a demo run defaults to held-out TokFSM sequences)"
    )
    add_data_arguments(data, flags=("--data", "--dataset"), required=False)
    data.add_argument(
        "--seq-len",
        type=int,
        default=None,
        help=f"tokens per row (default: {DEFAULT_SEQ_LEN}, or the model's n_ctx if shorter; a "
        "demo run: its sequence length)",
    )
    data.add_argument(
        "--max-sequences",
        type=int,
        default=None,
        help="cache at most this many rows (default: all of --data; a demo run: its n_held_out)",
    )
    model = parser.add_argument_group("model (a train run records its own)")
    add_model_arguments(model, required=False)
    model.add_argument(
        "--device", default=None, help="cpu, cuda, ... (default: TransformerLens' choice)"
    )
    how = parser.add_argument_group("what to cache")
    how.add_argument(
        "--hooks",
        action="append",
        default=None,
        metavar="HOOK[,HOOK...]",
        help="codebook hooks to cache (repeatable or comma-separated; default: every codebook)",
    )
    how.add_argument("--batch-size", type=int, default=32, help="sequences per forward pass")
    how.add_argument(
        "--scores",
        action="store_true",
        help="also store each chosen code's similarity (ranks top contexts; 2 bytes per id)",
    )
    how.add_argument(
        "--overwrite", action="store_true", help="replace an existing code cache at --out"
    )
    how.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(func=run_cache_command)


def _positive(flag: str, value: int | None) -> None:
    if value is not None and value < 1:
        raise ValueError(f"{flag} must be >= 1, got {value}.")


def check_output_dir(path: Path, marker: str, what: str, overwrite: bool) -> None:
    """Refuse to replace `path` unless it is empty, or (with --overwrite) an earlier `what`
    (recognised by `marker`): the writers swap the directory in whole, deleting what was there."""
    if not path.exists():
        return
    if not path.is_dir():
        raise ValueError(f"--out {str(path)!r} exists and is not a directory.")
    if not any(path.iterdir()):
        return
    if not (path / marker).is_file():
        raise ValueError(
            f"--out {str(path)!r} holds other files, which writing a {what} there would delete; "
            "choose a new or empty directory."
        )
    if not overwrite:
        raise ValueError(
            f"--out {str(path)!r} already holds a {what}; pass --overwrite to replace it."
        )


def _hook_list(values: Sequence[str] | None) -> list[str] | None:
    if values is None:
        return None
    hooks = [name.strip() for value in values for name in value.split(",") if name.strip()]
    if not hooks:
        raise ValueError("--hooks names no hook.")
    return hooks


def corpus_for(
    args: argparse.Namespace, loaded: ModelDir, seq_len: int
) -> Tensor | Iterator[Tensor]:
    """The token rows to cache: --data read as the trainer reads it (every row, the last batch
    may be short), or for a demo run without --data its task's held-out sequences."""
    if args.dataset is None:
        if loaded.task is None or loaded.config is None:
            raise ValueError(
                f"--data is needed: {str(loaded.path)!r} is a train run, which holds no corpus "
                "(only a TokFSM demo run defaults to sequences of its task)."
            )
        if seq_len != loaded.task.seq_len:
            loaded.task = type(loaded.task)(loaded.task.fsm, seq_len)
        n = args.max_sequences or loaded.config.n_held_out
        return loaded.task.tokens(n, split="eval", seed=loaded.config.seed)
    from tl_codebook.training.cli import token_batches_from_args

    rows, _ = token_batches_from_args(args, loaded.model, 1, seq_len)
    try:
        first = next(rows)
    except ValueError as err:
        raise ValueError(f"nothing to cache: {err}") from None
    return _batched(first, rows, args.batch_size, args.max_sequences)


def _batched(
    first: Tensor, rows: Iterator[Tensor], batch_size: int, limit: int | None
) -> Iterator[Tensor]:
    """Single rows `[1, seq_len]` regrouped into batches of `batch_size` (the last one short),
    stopping after `limit` rows."""
    pending = [first]
    taken = 1
    for row in rows:
        if limit is not None and taken >= limit:
            break
        if len(pending) == batch_size:
            yield torch.cat(pending)
            pending = []
        pending.append(row)
        taken += 1
    yield torch.cat(pending)


def run_cache_command(args: argparse.Namespace) -> int:
    from tl_codebook.analysis.cache import MANIFEST, CodeCache
    from tl_codebook.files import json_text

    for flag, value in (
        ("--batch-size", args.batch_size),
        ("--max-sequences", args.max_sequences),
        ("--seq-len", args.seq_len),
    ):
        _positive(flag, value)
    out = Path(args.out)
    check_output_dir(out, MANIFEST, "code cache", args.overwrite)
    hooks = _hook_list(args.hooks)
    loaded = load_model_dir(
        args.model_dir,
        model=args.model,
        architecture=args.architecture,
        trust_remote_code=args.trust_remote_code,
        device=args.device,
    )
    n_ctx = int(loaded.model.cfg.n_ctx)
    seq_len = args.seq_len or loaded.default_seq_len
    if seq_len > n_ctx:
        raise ValueError(f"--seq-len {seq_len} is longer than the model's context (n_ctx {n_ctx}).")
    tokens = corpus_for(args, loaded, seq_len)
    cache = CodeCache.build(
        loaded.model,
        tokens,
        out,
        hooks=hooks,
        batch_size=args.batch_size,
        vocab=loaded.vocab,
        scores=args.scores,
        progress=not args.quiet,
    )
    print(json_text(cache_summary(cache)))
    return 0


def directory_size(path: Path) -> tuple[int, int]:
    """(bytes, files) of every file under `path`."""
    files = [p for p in Path(path).rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files), len(files)


def cache_summary(cache: CodeCache) -> dict[str, Any]:
    """What `tl-codebook cache` prints: where, how much, and the bytes each id costs on disk."""
    size, files = directory_size(cache.path)
    return {
        "cache": str(cache.path),
        "n_seq": cache.n_seq,
        "seq_len": cache.seq_len,
        "n_tokens": cache.n_tokens,
        "hooks": cache.hooks,
        "bytes": size,
        "files": files,
    }


# -- tl-codebook search ------------------------------------------------------------------------


def add_search_command(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = SEARCH_EXAMPLES
    parser.add_argument("cache_dir", metavar="DIR", help="a code cache (tl-codebook cache --out)")
    query = parser.add_mutually_exclusive_group(required=True)
    query.add_argument(
        "--regex",
        help="positions covered by matches over the decoded text (group 1 if the pattern has one)",
    )
    query.add_argument(
        "--token",
        action="append",
        metavar="T",
        help="positions holding this token string, exactly as in the cache's vocab (repeatable)",
    )
    query.add_argument(
        "--token-id", action="append", type=int, metavar="I", help="a token id (repeatable)"
    )
    query.add_argument(
        "--code",
        type=int,
        metavar="C",
        help="instead of ranking codes: the top contexts of code C (of --hook, --group)",
    )
    parser.add_argument("--hook", default=None, help="search one codebook (default: all)")
    parser.add_argument("--group", type=int, default=0, help="with --code: the codebook group")
    parser.add_argument(
        "--min-precision",
        type=float,
        default=0.0,
        help="list only codes whose firings fall on the query at least this often (0 to 1)",
    )
    parser.add_argument(
        "--min-recall",
        type=float,
        default=0.0,
        help="list only codes that fire on at least this fraction of the query's positions "
        "(0 to 1)",
    )
    parser.add_argument("--top", type=int, default=20, help="how many codes (or contexts) to list")
    parser.add_argument(
        "--window", type=int, default=8, help="with --code: tokens shown either side"
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.set_defaults(func=run_search_command)


def token_ids_for(cache: CodeCache, strings: Sequence[str]) -> list[int]:
    """Every token id whose string in the cache's vocab is one of `strings` (a vocab may hold
    one string under several ids); an unknown string is a ValueError with close matches."""
    from tl_codebook.configs import did_you_mean

    by_string: dict[str, list[int]] = {}
    for token_id, text in enumerate(cache.vocab):
        by_string.setdefault(text, []).append(token_id)
    ids = []
    for text in strings:
        if text not in by_string:
            raise ValueError(
                f"--token {text!r} is not a token of the cache's vocabulary "
                f"({len(cache.vocab)} strings).{did_you_mean(text, list(by_string))}"
            )
        ids.extend(by_string[text])
    return sorted(set(ids))


def _open_cache(path: str) -> CodeCache:
    from tl_codebook.analysis.cache import CodeCache

    return CodeCache.open(path)


def run_search_command(args: argparse.Namespace) -> int:
    cache = _open_cache(args.cache_dir)
    _positive("--top", args.top)
    if args.code is not None:
        return _print_contexts(cache, args)
    if args.hook is not None:
        cache.shape_of(args.hook)  # an unknown hook: one line listing the cache's hooks
    tokens = None
    if args.token is not None:
        tokens = token_ids_for(cache, args.token)
    elif args.token_id is not None:
        tokens = list(args.token_id)
    matches = cache.search(
        args.hook,
        tokens=tokens,
        regex=args.regex,
        min_precision=args.min_precision,
        min_recall=args.min_recall,
        top=args.top,
    )
    if args.json:
        query = {"regex": args.regex} if args.regex is not None else {"tokens": tokens}
        print(
            json.dumps(
                {
                    "query": {**query, "hook": args.hook},
                    "matches": [m.to_dict() for m in matches],
                },
                indent=2,
            )
        )
    else:
        print(format_matches(matches))
    return 0


def format_matches(matches: Sequence[CodeMatch]) -> str:
    """The readable table of `tl-codebook search`: one code per row, best F1 first."""
    if not matches:
        return "no code fires on the searched positions (or none passes the filters)"
    header = ("hook", "group", "code", "precision", "recall", "F1", "count", "TP")
    rows = [
        (
            m.hook,
            str(m.group),
            str(m.code),
            f"{m.precision:.3f}",
            f"{m.recall:.3f}",
            f"{m.f1:.3f}",
            str(m.count),
            str(m.true_positives),
        )
        for m in matches
    ]
    return _table(header, rows, left=1)


def _table(
    header: Sequence[str], rows: Sequence[Sequence[str]], left: int, text_last: bool = False
) -> str:
    """Columns padded to their widest cell; the first `left` columns (and with `text_last` the
    last one) left-aligned, numbers right-aligned."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            cell.ljust(w) if i < left or (text_last and i == len(widths) - 1) else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(cells, widths))
        ).rstrip()

    return "\n".join([line(header), *(line(row) for row in rows)])


def _print_contexts(cache: CodeCache, args: argparse.Namespace) -> int:
    hook = args.hook
    if hook is None:
        if len(cache.hooks) != 1:
            raise ValueError(
                f"--code needs --hook: the cache holds {len(cache.hooks)} codebooks "
                f"({', '.join(cache.hooks)})."
            )
        hook = cache.hooks[0]
    cache.check_code(hook, args.code, args.group)
    contexts = cache.top_contexts(hook, args.code, args.group, n=args.top, window=args.window)
    vocab = cache.vocab
    if args.json:
        print(
            json.dumps(
                {
                    "hook": hook,
                    "group": args.group,
                    "code": args.code,
                    "count": int(cache.index(hook).counts()[args.group, args.code]),
                    "contexts": [
                        {**c.to_dict(), "tokens": [vocab[t] for t in c.token_ids]} for c in contexts
                    ],
                },
                indent=2,
            )
        )
        return 0
    count = int(cache.index(hook).counts()[args.group, args.code])
    print(f"{hook} group {args.group} code {args.code}: fires on {count} tokens")
    scored = cache.scores(hook) is not None
    rows = []
    for c in contexts:
        text = [repr(vocab[t])[1:-1] for t in c.token_ids]  # escapes shown, quotes dropped
        text[c.center] = f"[[{text[c.center]}]]"
        score = [f"{c.score:.3f}"] if scored and c.score is not None else []
        rows.append((str(c.seq), str(c.pos), *score, " ".join(text)))
    if rows:
        header = ("seq", "pos", "score", "context") if scored else ("seq", "pos", "context")
        print(_table(header, rows, left=0, text_last=True))
    return 0


# -- tl-codebook dashboard ---------------------------------------------------------------------


def add_dashboard_command(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("cache_dir", metavar="DIR", help="a code cache (tl-codebook cache --out)")
    parser.add_argument("--out", required=True, help="the site directory to write")
    parser.add_argument(
        "--model-dir",
        default=None,
        help="the run the cache was built from: adds logit effects and similar codes (a demo "
        "run also adds its FSM states as labels and its steering results)",
    )
    model = parser.add_argument_group("model of a train run (it records its own)")
    add_model_arguments(model, required=False)
    model.add_argument("--device", default=None, help="cpu, cuda, ... (default: TransformerLens')")
    parser.add_argument(
        "--top-codes",
        type=int,
        default=None,
        help="details only for the N most frequent codes of each codebook group (default: all)",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an existing site at --out"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    parser.set_defaults(func=run_dashboard_command)


SITE_MARKER = "index.html"


def run_dashboard_command(args: argparse.Namespace) -> int:
    from tl_codebook.analysis.dashboard import write_dashboard
    from tl_codebook.files import json_text

    out = Path(args.out)
    check_output_dir(out, SITE_MARKER, "dashboard", args.overwrite)
    _positive("--top-codes", args.top_codes)
    cache = _open_cache(args.cache_dir)
    model = labels = steering = None
    if args.model_dir is not None:
        loaded = load_model_dir(
            args.model_dir,
            model=args.model,
            architecture=args.architecture,
            trust_remote_code=args.trust_remote_code,
            device=args.device,
        )
        cache.check_model(loaded.model)
        model = loaded.model
        if loaded.task is not None:
            from tl_codebook.fsm.experiment import dashboard_labels
            from tl_codebook.fsm.report import steering_rows

            labels = dashboard_labels(loaded.task, cache)
            steering = steering_rows(loaded.metrics.get("interventions"))
    elif args.model is not None:
        raise ValueError("--model goes with --model-dir (the run whose codebooks to load).")
    index = write_dashboard(
        cache, out, model=model, labels=labels, steering=steering, top_codes=args.top_codes
    )
    size, files = directory_size(out)
    print(json_text({"dashboard": str(index), "bytes": size, "files": files}))
    return 0


__all__ = [
    "ModelDir",
    "add_cache_command",
    "add_dashboard_command",
    "add_search_command",
    "cache_summary",
    "directory_size",
    "format_matches",
    "load_model_dir",
    "token_ids_for",
]
