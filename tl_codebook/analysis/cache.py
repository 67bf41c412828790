"""`CodeCache`: a model's code ids over a corpus, computed once and kept on disk as plain `.npy`
arrays (memory-mapped on open), so every question about codes is answered without the model.

Layout (one directory, built under a temporary name and swapped in whole, manifest last):
`manifest.json`, `tokens.npy` (int32 [n_seq, seq_len]), `vocab.json` (token strings),
`codes/<file_id>.npy` (uint16 for <= 65,536 codes, else uint32; [n_seq, seq_len, n_groups, k]),
optional `scores/<file_id>.npy` (float16, the similarity of each chosen code) and the inverted
index `index/<file_id>.offsets.npy` / `.positions.npy` (CSR over (group, code) -> flat token
positions `seq * seq_len + pos`, ascending, each position once), which makes a per-code query
O(firings). Hook names contain dots and never become paths; `file_id`s ("h00", ...) do.

Under torchrun each rank computes its share of the batches into a shard directory of its own,
and rank 0 joins the shards in the original batch order: the same cache one process writes.
"""

from __future__ import annotations

import datetime
import json
import shutil
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch
from jaxtyping import Int, Integer
from numpy.lib.format import open_memmap
from torch import Tensor

from tl_codebook.codebook import Codebook
from tl_codebook.files import TEMP_PREFIX, atomic_directory, atomic_write_json
from tl_codebook.fingerprint import model_fingerprint, model_name_of
from tl_codebook.hooks.model import codebooks_of
from tl_codebook.snap import code_scores

if TYPE_CHECKING:
    from tl_codebook.analysis.contexts import CodeContext
    from tl_codebook.analysis.search import CodeMatch

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TOKENS_FILE = "tokens.npy"
VOCAB_FILE = "vocab.json"
SHARD_FILE = "shard.json"
TOKEN_DTYPE = np.dtype(np.int32)
SCORE_DTYPE = np.dtype(np.float16)


class CodeCacheError(ValueError):
    """A directory that is not a complete, intact code cache (or not one for the given model).

    A `ValueError`: raised by `CodeCache.open` (no cache there, an unfinished build, another
    format version, a missing or truncated array file) and `CodeCache.check_model`.
    """


class UnknownCacheHookError(KeyError, ValueError):
    """A hook the cache does not hold; the message lists the hooks it does hold.

    Both a `KeyError` (a lookup by name failed) and a `ValueError` (a bad argument), so either
    `except` catches it.
    """

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0]) if self.args else ""


def code_dtype(num_codes: int) -> np.dtype:
    """The smallest unsigned integer type holding ids 0..num_codes-1 (uint16 up to 65,536 codes:
    2 bytes per id, where the reference implementation keeps int64)."""
    if num_codes < 1:
        raise ValueError(f"num_codes must be >= 1, got {num_codes}.")
    for dtype in (np.uint16, np.uint32):
        if num_codes - 1 <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    return np.dtype(np.uint64)


@dataclass(frozen=True)
class CodeIndex:
    """The inverted index of one codebook: where each (group, code) fires, as CSR arrays.

    `positions[offsets[g * num_codes + c] : offsets[g * num_codes + c + 1]]` are the flat
    token positions (`seq * seq_len + pos`, ascending) where code `c` of group `g` is among the
    token's k codes.
    """

    offsets: np.ndarray
    """int64 `[n_groups * num_codes + 1]`: where each (group, code)'s positions start."""
    positions: np.ndarray
    """int32 (int64 for huge caches) `[firings]`: flat token positions, grouped by code."""
    n_groups: int
    """Groups of the codebook."""
    num_codes: int
    """Codes per group."""

    def positions_of(self, code: int, group: int = 0) -> np.ndarray:
        """Flat positions where `code` of `group` fires, ascending (a view: O(firings)).

        Returns:
            `[firings]` flat positions `seq * seq_len + pos`.

        Raises:
            ValueError: for a group or code out of range.
        """
        if not 0 <= group < self.n_groups:
            raise ValueError(f"group must lie in [0, {self.n_groups}), got {group}.")
        if not 0 <= code < self.num_codes:
            raise ValueError(f"code must lie in [0, {self.num_codes}), got {code}.")
        row = group * self.num_codes + code
        return self.positions[int(self.offsets[row]) : int(self.offsets[row + 1])]

    def counts(self) -> np.ndarray:
        """Tokens on which each code fires, [n_groups, num_codes] (int64)."""
        return np.diff(self.offsets).reshape(self.n_groups, self.num_codes)


def build_index(
    codes: Integer[np.ndarray, "n_seq pos n_groups k"], num_codes: int
) -> tuple[Int[np.ndarray, " rows"], Int[np.ndarray, " firings"]]:
    """CSR (offsets, positions) over (group, code) from codes [n_seq, seq_len, n_groups, k].

    Per group one stable argsort of the flat ids (numpy's radix sort for uint16 ids): sorting
    [position-major] ids stably keeps each code's positions ascending, and a position where a
    code sits in two of its k slots becomes two equal neighbours, dropped once. No Python loop
    over codes or tokens.
    """
    n_groups, k = codes.shape[-2], codes.shape[-1]
    flat = codes.reshape(-1, n_groups, k)
    n_tokens = flat.shape[0]
    pos_dtype = np.int32 if n_tokens * k < np.iinfo(np.int32).max else np.int64
    offsets = np.zeros(n_groups * num_codes + 1, dtype=np.int64)
    parts: list[np.ndarray] = []
    for group in range(n_groups):
        ids = np.ascontiguousarray(flat[:, group, :]).reshape(-1)
        order = np.argsort(ids, kind="stable").astype(pos_dtype, copy=False)
        sorted_ids = ids[order]
        positions = order // k if k > 1 else order
        if k > 1 and positions.size:
            keep = np.ones(positions.size, dtype=bool)
            keep[1:] = (sorted_ids[1:] != sorted_ids[:-1]) | (positions[1:] != positions[:-1])
            positions, sorted_ids = positions[keep], sorted_ids[keep]
        counts = np.bincount(sorted_ids, minlength=num_codes)
        offsets[1 + group * num_codes : 1 + (group + 1) * num_codes] = counts
        parts.append(positions)
    np.cumsum(offsets, out=offsets)
    positions = np.concatenate(parts) if parts else np.zeros(0, dtype=pos_dtype)
    return offsets, positions.astype(pos_dtype, copy=False)


# -- building ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Spec:
    """What the cache stores for one codebook."""

    name: str
    file_id: str
    n_groups: int
    k: int
    num_codes: int
    similarity: str

    @property
    def dtype(self) -> np.dtype:
        return code_dtype(self.num_codes)


def _select_codebooks(model: torch.nn.Module, hooks: str | Sequence[str] | None) -> list[_Spec]:
    books = codebooks_of(model)
    if not books:
        raise ValueError(
            "The model has no codebooks, so there are no codes to cache; attach one first "
            "(HookedCodebookTransformer.add_codebook)."
        )
    names = list(books) if hooks is None else [hooks] if isinstance(hooks, str) else list(hooks)
    if not names:
        raise ValueError(f"hooks is empty; the model's codebooks are: {', '.join(books)}.")
    for name in names:
        if name not in books:
            raise ValueError(
                f"{name!r} is not a codebook of the model; its codebooks are: {', '.join(books)}."
            )
    if len(set(names)) != len(names):
        raise ValueError(f"hooks names a codebook twice: {names}.")
    specs = []
    for i, name in enumerate(names):
        cfg = books[name].cfg
        specs.append(_Spec(name, f"h{i:02d}", cfg.n_groups, cfg.k, cfg.num_codes, cfg.similarity))
    return specs


def _stop_layer(model: torch.nn.Module, names: list[str]) -> int | None:
    """The `stop_at_layer` that still runs every named codebook (None: run the whole model)."""
    n_layers = getattr(getattr(model, "cfg", None), "n_layers", None)
    if n_layers is None:
        return None
    last = -1
    for name in names:
        head = name.split(".")
        if head[0] == "blocks" and len(head) > 1 and head[1].isdigit():
            last = max(last, int(head[1]))
        elif name not in ("hook_embed", "hook_pos_embed", "hook_tokens"):
            return None  # after the blocks (ln_final, unembed): the whole forward
    return last + 1 if last + 1 < n_layers else None


def _batches(
    tokens: Tensor | np.ndarray | Iterable[Tensor | np.ndarray], batch_size: int
) -> tuple[Iterator[Tensor], int | None, int | None]:
    """The corpus as batches of int token ids, plus (n_seq, seq_len) when known up front."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}.")
    if isinstance(tokens, np.ndarray):
        tokens = torch.from_numpy(tokens)
    if isinstance(tokens, Tensor):
        whole = _check_batch(tokens)
        if whole.shape[0] == 0 or whole.shape[1] == 0:
            raise ValueError(
                f"The corpus is empty (tokens of shape {tuple(whole.shape)}); a code cache "
                "needs at least one sequence of at least one token."
            )
        return iter(whole.split(batch_size)), whole.shape[0], whole.shape[1]
    return (_check_batch(t) for t in tokens), None, None


def _check_batch(batch: Any) -> Tensor:
    if isinstance(batch, np.ndarray):
        batch = torch.from_numpy(batch)
    if not isinstance(batch, Tensor):
        raise TypeError(
            f"tokens must be an Int[n_seq, pos] tensor or an iterable of such batches; got a "
            f"batch of type {type(batch).__name__}."
        )
    if batch.ndim != 2 or batch.dtype.is_floating_point or batch.dtype == torch.bool:
        raise ValueError(
            f"Each token batch must be an integer tensor [n_seq, pos], got dtype {batch.dtype} "
            f"and shape {tuple(batch.shape)}."
        )
    return batch


def _run(
    model: torch.nn.Module,
    batches: Iterator[Tensor],
    specs: list[_Spec],
    want_scores: bool,
    progress: bool,
    total: int | None,
    select: Any = None,
) -> Iterator[tuple[int, np.ndarray, dict[str, np.ndarray], dict[str, np.ndarray]]]:
    """Run the model over the batches (those `select(index)` keeps), yielding per batch its
    index, tokens and each codebook's codes (and scores), as numpy arrays in the cache's dtypes."""
    from tqdm.auto import tqdm

    books = codebooks_of(model)
    device = getattr(getattr(model, "cfg", None), "device", None)
    stop = _stop_layer(model, [s.name for s in specs])
    kwargs: dict[str, Any] = {"return_type": None}
    if stop is not None:
        kwargs["stop_at_layer"] = stop
    seen: dict[str, Tensor] = {}

    def save(tensor: Tensor, hook: Any) -> None:
        seen[hook.name] = tensor.detach()

    fwd = [(f"{s.name}.hook_codes", save) for s in specs]
    if want_scores:
        fwd += [(f"{s.name}.hook_codebook_in", save) for s in specs]
    seq_len: int | None = None
    bar = tqdm(total=total, disable=not progress, desc="code cache", unit="seq")
    try:
        for index, batch in enumerate(batches):
            if seq_len is None:
                seq_len = batch.shape[1]
            if batch.shape[1] != seq_len or batch.shape[1] == 0:
                raise ValueError(
                    f"Every token batch must have the same non-zero length; batch {index} has "
                    f"{batch.shape[1]} positions, the first had {seq_len}."
                )
            if select is not None and not select(index):
                continue
            seen.clear()
            # a context, not a decorator: the generator runs after the decorated call returns
            with torch.no_grad(), cast(Any, model).hooks(fwd_hooks=fwd):
                model(batch.to(device) if device is not None else batch, **kwargs)
            codes: dict[str, np.ndarray] = {}
            scores: dict[str, np.ndarray] = {}
            for spec in specs:
                ids = seen[f"{spec.name}.hook_codes"]
                codes[spec.file_id] = ids.to("cpu").numpy().astype(spec.dtype)
                if want_scores:
                    scores[spec.file_id] = _chosen_scores(
                        books[spec.name], seen[f"{spec.name}.hook_codebook_in"], ids
                    )
            yield index, batch.to("cpu").numpy().astype(TOKEN_DTYPE), codes, scores
            bar.update(batch.shape[0])
    finally:
        bar.close()


def _chosen_scores(codebook: Codebook, x: Tensor, ids: Int[Tensor, "... n_groups k"]) -> np.ndarray:
    """The similarity (`snap.code_scores`) of each token to each of its chosen codes, float16."""
    rows, _ = codebook._grouped(x)
    flat_ids = ids.reshape(rows.shape[0], ids.shape[-2], ids.shape[-1])
    step = codebook.cfg.chunk_size
    out = torch.empty(flat_ids.shape, dtype=torch.float32)
    codes = codebook.codes.detach()
    for start in range(0, rows.shape[0], step):
        scores = code_scores(rows[start : start + step], codes, codebook.cfg.similarity)
        chosen = scores.gather(-1, flat_ids[start : start + step])
        out[start : start + step] = chosen.float().cpu()
    return out.reshape(ids.shape).numpy().astype(SCORE_DTYPE)


def _vocab_of(model: torch.nn.Module, vocab: Sequence[str] | None, max_id: int) -> list[str]:
    """Token strings: the given list, else the tokenizer's decoding of each single id (what a
    regex over the joined text needs), else `str(id)`."""
    size = getattr(getattr(model, "cfg", None), "d_vocab", None) or max_id + 1
    size = max(int(size), max_id + 1)
    if vocab is not None:
        vocab = list(vocab)
        if not all(isinstance(v, str) for v in vocab):
            raise TypeError("vocab must be a list of strings (one per token id).")
        if len(vocab) <= max_id:
            raise ValueError(
                f"vocab has {len(vocab)} strings, but the corpus holds token id {max_id}."
            )
        return vocab
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is not None:
        return [tokenizer.decode([i]) for i in range(size)]
    return [str(i) for i in range(size)]


def _relative(spec: _Spec, kind: str) -> str:
    return {
        "codes": f"codes/{spec.file_id}.npy",
        "scores": f"scores/{spec.file_id}.npy",
        "offsets": f"index/{spec.file_id}.offsets.npy",
        "positions": f"index/{spec.file_id}.positions.npy",
    }[kind]


def _write_direct(
    out: Path, results: Iterator[Any], specs: list[_Spec], n_seq: int, seq_len: int, scores: bool
) -> None:
    """Write every batch straight into preallocated memory-mapped files (size known)."""
    tokens = open_memmap(out / TOKENS_FILE, "w+", TOKEN_DTYPE, (n_seq, seq_len))
    codes, score_files = {}, {}
    for s in specs:
        shape = (n_seq, seq_len, s.n_groups, s.k)
        codes[s.file_id] = open_memmap(out / _relative(s, "codes"), "w+", s.dtype, shape)
        if scores:
            score_files[s.file_id] = open_memmap(
                out / _relative(s, "scores"), "w+", SCORE_DTYPE, shape
            )
    row = 0
    for _, tok, batch_codes, batch_scores in results:
        end = row + tok.shape[0]
        tokens[row:end] = tok
        for file_id, value in batch_codes.items():
            codes[file_id][row:end] = value
        for file_id, value in batch_scores.items():
            score_files[file_id][row:end] = value
        row = end
    for array in (tokens, *codes.values(), *score_files.values()):
        array.flush()


def _write_chunks(out: Path, results: Iterator[Any]) -> list[list[int]]:
    """Write each batch as its own chunk files (size unknown, or one rank's share); returns
    [[batch index, n_seq], ...]."""
    chunks = out / "chunks"
    chunks.mkdir()
    written = []
    for index, tok, batch_codes, batch_scores in results:
        np.save(chunks / f"{index:08d}.tokens.npy", tok)
        for file_id, value in batch_codes.items():
            np.save(chunks / f"{index:08d}.{file_id}.codes.npy", value)
        for file_id, value in batch_scores.items():
            np.save(chunks / f"{index:08d}.{file_id}.scores.npy", value)
        written.append([index, int(tok.shape[0])])
    return written


def _assemble(
    out: Path, sources: list[tuple[Path, list[list[int]]]], specs: list[_Spec], scores: bool
) -> tuple[int, int]:
    """Concatenate chunk files (from one or several directories) in batch order into the
    cache's arrays; returns (n_seq, seq_len)."""
    order = sorted((index, rows, where) for where, written in sources for index, rows in written)
    n_seq = sum(rows for _, rows, _ in order)
    if n_seq == 0:
        raise ValueError("The corpus is empty (no token batches); a code cache needs at least one.")
    first = np.load(order[0][2] / "chunks" / f"{order[0][0]:08d}.tokens.npy", mmap_mode="r")
    seq_len = int(first.shape[1])
    kinds: list[tuple[str, str, np.dtype, tuple[int, ...]]] = [
        ("tokens", TOKENS_FILE, TOKEN_DTYPE, (n_seq, seq_len))
    ]
    for s in specs:
        shape: tuple[int, ...] = (n_seq, seq_len, s.n_groups, s.k)
        kinds.append((f"{s.file_id}.codes", _relative(s, "codes"), s.dtype, shape))
        if scores:
            kinds.append((f"{s.file_id}.scores", _relative(s, "scores"), SCORE_DTYPE, shape))
    for suffix, relative, dtype, shape in kinds:
        target = open_memmap(out / relative, "w+", dtype, shape)
        row = 0
        for index, rows, where in order:
            target[row : row + rows] = np.load(where / "chunks" / f"{index:08d}.{suffix}.npy")
            row += rows
        target.flush()
        del target
    return n_seq, seq_len


# -- the cache ---------------------------------------------------------------------------------


class CodeCache:
    """Token ids and every cached codebook's code ids over a corpus, memory-mapped from disk.

    Make one with `CodeCache.build(model, tokens, path)`, reopen it with `CodeCache.open(path)`.
    Arrays are read-only `np.memmap`s: a cache larger than memory works, and nothing is copied
    until a query touches it. Queries name a codebook by its hook name; an unknown one raises
    `UnknownCacheHookError` listing the hooks the cache holds.

    Args:
        path: the cache directory.
        manifest: its parsed `manifest.json`.
        arrays: the memory-mapped arrays. Use `build` or `open` rather than this constructor.
    """

    def __init__(self, path: Path, manifest: dict[str, Any], arrays: dict[str, np.ndarray]):
        self._path = path
        self._manifest = manifest
        self._arrays = arrays
        self._hooks = {h["name"]: h for h in manifest["hooks"]}
        self._vocab: list[str] | None = None
        self._text: tuple[str, np.ndarray] | None = None

    # -- building and opening --------------------------------------------------------------

    @classmethod
    def build(
        cls,
        model: torch.nn.Module,
        tokens: Int[Tensor, "n_seq pos"]
        | Int[np.ndarray, "n_seq pos"]
        | Iterable[Int[Tensor, "batch pos"]],
        path: str | Path,
        hooks: str | Sequence[str] | None = None,
        batch_size: int = 32,
        vocab: Sequence[str] | None = None,
        scores: bool = False,
        progress: bool = True,
    ) -> CodeCache:
        """Run `model` once over `tokens` (a tensor, split into `batch_size` sequences, or an
        iterable of batches) and write its codebooks' code ids (all, or `hooks`) to `path`.

        Eval mode and no grad; the codebooks' usage statistics are left as they were; the forward
        stops after the last cached codebook's block. `scores=True` also stores the similarity of
        each chosen code. Atomic: until the manifest is written last, nothing opens as a cache.
        Under torchrun every rank must call this with the same arguments (see module docstring).

        Args:
            model: a model with codebooks attached.
            tokens: integer token ids `[n_seq, pos]` (tensor or numpy array), or an iterable of
                `[batch, pos]` batches (all of one `pos`).
            path: the directory to write (replaced whole when it exists).
            hooks: the codebooks to cache (default: all of the model's).
            batch_size: sequences per forward when `tokens` is one array.
            vocab: the token strings, indexed by id (default: the tokenizer's decoding of each
                id, else `str(id)`).
            scores: also store each chosen code's similarity (float16).
            progress: show a progress bar.

        Returns:
            The new cache, opened.

        Raises:
            ValueError: if the model has no codebooks, `hooks` is empty, names a non-codebook
                or one twice, `batch_size < 1`, the corpus is empty, a batch is not an integer
                `[n_seq, pos]` tensor, a token id is negative, or `vocab` is shorter than the
                largest token id.
            TypeError: for batches that are not tensors, or a `vocab` of non-strings.
        """
        from tl_codebook.training.distributed import dist_info_from_env, init_distributed

        specs = _select_codebooks(model, hooks)
        path = Path(path)
        info = dist_info_from_env()
        if info.enabled:
            device = next(iter(model.parameters())).device
            info = init_distributed(device)
        batches, n_seq, seq_len = _batches(tokens, batch_size)
        was_training = model.training
        tracking = {name: cb.track_stats for name, cb in codebooks_of(model).items()}
        model.eval()
        for cb in codebooks_of(model).values():
            cb.track_stats = False
        try:
            if info.enabled:
                return cls._build_distributed(
                    model, batches, path, specs, vocab, scores, progress, info
                )
            results = _run(model, batches, specs, scores, progress, n_seq)
            with atomic_directory(path) as out:
                _make_dirs(out, scores)
                shards: list[dict[str, Any]] = []
                if n_seq is not None and seq_len is not None:
                    _write_direct(out, results, specs, n_seq, seq_len, scores)
                else:
                    written = _write_chunks(out, results)
                    n_seq, seq_len = _assemble(out, [(out, written)], specs, scores)
                    shutil.rmtree(out / "chunks")
                _finish(out, model, specs, vocab, scores, n_seq, seq_len, shards)
        finally:
            model.train(was_training)
            for name, cb in codebooks_of(model).items():
                cb.track_stats = tracking.get(name, cb.track_stats)
        return cls.open(path)

    @classmethod
    def _build_distributed(
        cls,
        model: torch.nn.Module,
        batches: Iterator[Tensor],
        path: Path,
        specs: list[_Spec],
        vocab: Sequence[str] | None,
        scores: bool,
        progress: bool,
        info: Any,
    ) -> CodeCache:
        """Each rank runs the batches with index % world_size == rank into its shard directory;
        after a barrier rank 0 joins them in batch order into `path`; every rank opens it."""
        import torch.distributed as dist

        shard_root = path.with_name(path.name + ".shards")
        shard = shard_root / f"rank{info.rank}-of-{info.world_size}"

        def agree(failed: bool) -> None:  # every rank learns whether any rank failed
            flag = torch.tensor([int(failed)])
            dist.all_reduce(flag)
            if int(flag) and not failed:
                raise RuntimeError("Another rank failed while building the code cache.")

        try:
            shard_root.mkdir(parents=True, exist_ok=True)
            with atomic_directory(shard) as out:
                results = _run(
                    model, batches, specs, scores, progress and info.is_main, None,
                    select=lambda i: i % info.world_size == info.rank,
                )  # fmt: skip
                written = _write_chunks(out, results)
                atomic_write_json(out / SHARD_FILE, {"rank": info.rank, "batches": written})
        except BaseException:
            agree(True)
            raise
        agree(False)
        if info.is_main:
            try:
                shards = []
                sources = []
                for rank in range(info.world_size):
                    where = shard_root / f"rank{rank}-of-{info.world_size}"
                    record = json.loads((where / SHARD_FILE).read_text())
                    sources.append((where, record["batches"]))
                    n = sum(rows for _, rows in record["batches"])
                    shards.append({"rank": rank, "batches": len(record["batches"]), "n_seq": n})
                with atomic_directory(path) as out:
                    _make_dirs(out, scores)
                    n_seq, seq_len = _assemble(out, sources, specs, scores)
                    _finish(out, model, specs, vocab, scores, n_seq, seq_len, shards)
                shutil.rmtree(shard_root, ignore_errors=True)
            except BaseException:
                agree(True)
                raise
            agree(False)
        else:
            agree(False)
        return cls.open(path)

    @classmethod
    def open(cls, path: str | Path, model: torch.nn.Module | None = None) -> CodeCache:
        """Open a complete cache memory-mapped (nothing is read into RAM).

        Refuses, naming the problem: a directory that is not a cache, an unfinished build, an
        unknown format, a missing or truncated array file, and (with `model`) a cache built for
        another model than `model` (weights fingerprint).

        Raises:
            CodeCacheError: for any of those problems.
        """
        path = Path(path)
        manifest = _read_manifest(path)
        n_seq, seq_len = int(manifest["n_seq"]), int(manifest["seq_len"])
        arrays = {"tokens": _load(path, TOKENS_FILE, TOKEN_DTYPE, (n_seq, seq_len))}
        for hook in manifest["hooks"]:
            shape = (n_seq, seq_len, int(hook["n_groups"]), int(hook["k"]))
            spec = _Spec(
                hook["name"], hook["file_id"], shape[2], shape[3], int(hook["num_codes"]), ""
            )
            rows = shape[2] * spec.num_codes + 1
            arrays[f"codes/{spec.file_id}"] = _load(
                path, _relative(spec, "codes"), np.dtype(hook["dtype"]), shape
            )
            if hook.get("has_scores"):
                arrays[f"scores/{spec.file_id}"] = _load(
                    path, _relative(spec, "scores"), SCORE_DTYPE, shape
                )
            arrays[f"offsets/{spec.file_id}"] = _load(
                path, _relative(spec, "offsets"), np.dtype(np.int64), (rows,)
            )
            arrays[f"positions/{spec.file_id}"] = _load(
                path,
                _relative(spec, "positions"),
                np.dtype(hook["index_dtype"]),
                (int(hook["index_positions"]),),
            )
        cache = cls(path, manifest, arrays)
        if model is not None:
            cache.check_model(model)
        return cache

    def check_model(self, model: torch.nn.Module) -> None:
        """Check that the cache was built for `model`'s weights (a fingerprint of them).

        Raises:
            CodeCacheError: if it was built for another model or other weights.
        """
        fingerprint = model_fingerprint(model)
        if fingerprint != self._manifest["model_fingerprint"]:
            raise CodeCacheError(
                f"The code cache {str(self._path)!r} was built for the model "
                f"{self._manifest['model_name']!r} (weights fingerprint "
                f"{self._manifest['model_fingerprint']}), not for the model given "
                f"({model_name_of(model)!r}, fingerprint {fingerprint}); rebuild the cache "
                "with this model (CodeCache.build)."
            )

    # -- what it holds -----------------------------------------------------------------------

    @property
    def path(self) -> Path:
        """The cache directory."""
        return self._path

    @property
    def manifest(self) -> dict[str, Any]:
        """The parsed `manifest.json`: format version, model name and fingerprint, sizes, and
        one entry per cached codebook (name, file id, n_groups, k, num_codes, dtypes)."""
        return self._manifest

    @property
    def hooks(self) -> list[str]:
        """The codebook hook names the cache holds, in build order."""
        return list(self._hooks)

    @property
    def n_seq(self) -> int:
        """Sequences in the cache (the first axis of every array)."""
        return int(self._manifest["n_seq"])

    @property
    def seq_len(self) -> int:
        """Tokens per sequence."""
        return int(self._manifest["seq_len"])

    @property
    def n_tokens(self) -> int:
        """All cached tokens: `n_seq * seq_len`."""
        return int(self._manifest["n_tokens"])

    @property
    def tokens(self) -> np.ndarray:
        """Token ids, int32 [n_seq, seq_len] (read-only memmap)."""
        return self._arrays["tokens"]

    @property
    def vocab(self) -> list[str]:
        """Token strings, indexed by token id (read from vocab.json on first use).

        Raises:
            CodeCacheError: if vocab.json is missing or unreadable.
        """
        if self._vocab is None:
            try:
                vocab = json.loads((self._path / VOCAB_FILE).read_text(encoding="utf-8"))
            except (OSError, ValueError) as err:
                raise CodeCacheError(
                    f"The code cache {str(self._path)!r} has no readable {VOCAB_FILE}: {err}"
                ) from err
            self._vocab = list(vocab)
        return self._vocab

    def _hook(self, hook: str) -> dict[str, Any]:
        if hook not in self._hooks:
            raise UnknownCacheHookError(
                f"The code cache holds no codebook at {hook!r}; it holds: {', '.join(self._hooks)}."
            )
        return self._hooks[hook]

    def codes(self, hook: str) -> np.ndarray:
        """Code ids at `hook`, [n_seq, seq_len, n_groups, k] (read-only memmap; the ids the
        model's `{hook}.hook_codes` gave).

        Raises:
            UnknownCacheHookError: for a hook the cache does not hold.
        """
        return self._arrays[f"codes/{self._hook(hook)['file_id']}"]

    def scores(self, hook: str) -> np.ndarray | None:
        """The similarity of each chosen code, float16 [n_seq, seq_len, n_groups, k], or None
        when the cache was built without `scores=True`.

        Raises:
            UnknownCacheHookError: for a hook the cache does not hold.
        """
        return self._arrays.get(f"scores/{self._hook(hook)['file_id']}")

    def index(self, hook: str) -> CodeIndex:
        """The inverted index of the codebook at `hook` (code -> positions).

        Raises:
            UnknownCacheHookError: for a hook the cache does not hold.
        """
        entry = self._hook(hook)
        file_id = entry["file_id"]
        return CodeIndex(
            self._arrays[f"offsets/{file_id}"],
            self._arrays[f"positions/{file_id}"],
            int(entry["n_groups"]),
            int(entry["num_codes"]),
        )

    def shape_of(self, hook: str) -> tuple[int, int, int]:
        """(n_groups, k, num_codes) of the codebook at `hook`.

        Raises:
            UnknownCacheHookError: for a hook the cache does not hold.
        """
        entry = self._hook(hook)
        return int(entry["n_groups"]), int(entry["k"]), int(entry["num_codes"])

    def check_code(self, hook: str, code: int, group: int = 0) -> None:
        """Check that `code` of `group` exists in the codebook at `hook`.

        Raises:
            UnknownCacheHookError: for a hook the cache does not hold.
            TypeError: for a non-integer (or bool) code or group.
            ValueError: for a group or code out of range.
        """
        n_groups, _, num_codes = self.shape_of(hook)
        if isinstance(group, bool) or not isinstance(group, (int, np.integer)):
            raise TypeError(f"group must be an integer, got {group!r}.")
        if isinstance(code, bool) or not isinstance(code, (int, np.integer)):
            raise TypeError(f"code must be an integer, got {code!r}.")
        if not 0 <= group < n_groups:
            raise ValueError(
                f"group {group} is out of range for the codebook at {hook!r}: valid groups are "
                f"0..{n_groups - 1}."
            )
        if not 0 <= code < num_codes:
            raise ValueError(
                f"code {code} is out of range for the codebook at {hook!r}: valid codes are "
                f"0..{num_codes - 1}."
            )

    def text_offsets(self) -> tuple[str, np.ndarray]:
        """The corpus as one string joined from `vocab` (sequences back to back, no separator)
        and `starts` [n_tokens + 1]: flat token i spans `text[starts[i]:starts[i + 1]]`."""
        if self._text is None:
            vocab = self.vocab
            flat = np.asarray(self.tokens).reshape(-1)
            lengths = np.fromiter((len(v) for v in vocab), dtype=np.int64, count=len(vocab))
            starts = np.zeros(flat.size + 1, dtype=np.int64)
            np.cumsum(lengths[flat], out=starts[1:])
            strings = np.asarray(vocab, dtype=object)
            self._text = ("".join(strings[flat].tolist()), starts)
        return self._text

    def __repr__(self) -> str:
        return (
            f"CodeCache({str(self._path)!r}, n_seq={self.n_seq}, seq_len={self.seq_len}, "
            f"hooks={self.hooks})"
        )

    # -- queries (tl_codebook.analysis.search / contexts) -------------------------------------

    def search(
        self,
        hook: str | None = None,
        *,
        tokens: Any = None,
        regex: str | None = None,
        mask: Any = None,
        min_precision: float = 0.0,
        min_recall: float = 0.0,
        top: int | None = 20,
    ) -> list[CodeMatch]:
        """Codes ranked by F1 against the positions labelled by `tokens`, `regex` or `mask`
        (`tl_codebook.analysis.search.search`).

        Exactly one of `tokens` (token ids), `regex` (over the decoded text) or `mask`
        (booleans `[n_seq, seq_len]`) labels the positions; `hook` limits the search to one
        codebook.

        Returns:
            At most `top` (None: all) `CodeMatch`es, best F1 first.

        Raises:
            ValueError: for not exactly one query, an empty or out-of-vocabulary token list, a
                regex that does not compile, a mask of the wrong shape, `min_precision` /
                `min_recall` outside [0, 1], or `top < 1`.
            TypeError: for non-integer token ids or a non-boolean mask.
            UnknownCacheHookError: for a hook the cache does not hold.
        """
        from tl_codebook.analysis.search import search

        return search(
            self,
            hook,
            tokens=tokens,
            regex=regex,
            mask=mask,
            min_precision=min_precision,
            min_recall=min_recall,
            top=top,
        )

    def top_contexts(
        self, hook: str, code: int, group: int = 0, n: int = 20, window: int = 8
    ) -> list[CodeContext]:
        """Where `code` fires, with `window` tokens each side (`analysis.contexts.top_contexts`).

        The `n` firings with the highest stored score, or the first `n` in corpus order when
        the cache has no scores.

        Raises:
            UnknownCacheHookError: for a hook the cache does not hold.
            TypeError: for a non-integer code or group.
            ValueError: for a code or group out of range, or a negative `n` / `window`.
        """
        from tl_codebook.analysis.contexts import top_contexts

        return top_contexts(self, hook, code, group=group, n=n, window=window)

    def random_contexts(
        self, hook: str, code: int, group: int = 0, n: int = 20, window: int = 8, seed: int = 0
    ) -> list[CodeContext]:
        """A uniform random sample of the code's firings (`analysis.contexts.random_contexts`).

        `n` firings without replacement (all when there are fewer), in corpus order, the same
        for the same `seed`.

        Raises:
            UnknownCacheHookError: for a hook the cache does not hold.
            TypeError: for a non-integer code or group.
            ValueError: for a code or group out of range, or a negative `n` / `window`.
        """
        from tl_codebook.analysis.contexts import random_contexts

        return random_contexts(self, hook, code, group=group, n=n, window=window, seed=seed)

    def quantile_contexts(self, hook: str, code: int, group: int = 0, **kwargs: Any) -> Any:
        """Firings sampled across score quantiles (`analysis.contexts.quantile_contexts`).

        Keyword arguments `n_quantiles`, `n`, `window`, `seed`; returns one list of
        `CodeContext`s per quantile, the best first (ValueError for `n_quantiles < 1`).

        Raises:
            UnknownCacheHookError: for a hook the cache does not hold.
            TypeError: for a non-integer code or group.
            ValueError: for a code or group out of range, or a negative `n` / `window`.
        """
        from tl_codebook.analysis.contexts import quantile_contexts

        return quantile_contexts(self, hook, code, group=group, **kwargs)

    def code_density(self, hook: str) -> Any:
        """Firing frequency of every code (`analysis.contexts.code_density`).

        Returns:
            float64 `[n_groups, num_codes]`: the fraction of cached tokens at which each code
                fires.

        Raises:
            UnknownCacheHookError: for a hook the cache does not hold.
        """
        from tl_codebook.analysis.contexts import code_density

        return code_density(self, hook)

    def cofiring(self, hook: str, code: int, group: int = 0, top: int = 10) -> Any:
        """Codes of every codebook whose positions overlap this code's most (Jaccard;
        `analysis.contexts.cofiring`).

        Returns:
            At most `top` `CoFiring`s (hook, group, code, Jaccard index, overlap), best first.

        Raises:
            UnknownCacheHookError: for a hook the cache does not hold.
            TypeError: for a non-integer code or group.
            ValueError: for a code or group out of range, or `top < 1`.
        """
        from tl_codebook.analysis.contexts import cofiring

        return cofiring(self, hook, code, group=group, top=top)

    def topic_codes(self, hook: str, min_fraction: float = 0.2) -> Any:
        """Codes firing on at least `min_fraction` of one sequence's tokens
        (`analysis.contexts.topic_codes`).

        Returns:
            A `TopicCode` per such code (its sequences and fractions), highest fraction first.

        Raises:
            UnknownCacheHookError: for a hook the cache does not hold.
            ValueError: for `min_fraction` outside (0, 1].
        """
        from tl_codebook.analysis.contexts import topic_codes

        return topic_codes(self, hook, min_fraction=min_fraction)


# -- on-disk helpers ---------------------------------------------------------------------------


def _make_dirs(out: Path, scores: bool) -> None:
    (out / "codes").mkdir()
    (out / "index").mkdir()
    if scores:
        (out / "scores").mkdir()


def _finish(
    out: Path,
    model: torch.nn.Module,
    specs: list[_Spec],
    vocab: Sequence[str] | None,
    scores: bool,
    n_seq: int,
    seq_len: int,
    shards: list[dict[str, Any]],
) -> None:
    """Build the index from the written codes, save the vocab, and write the manifest last."""
    tokens = np.load(out / TOKENS_FILE, mmap_mode="r")
    max_id = int(tokens.max()) if tokens.size else 0
    if tokens.size and int(tokens.min()) < 0:
        raise ValueError(f"Token ids must be >= 0, got {int(tokens.min())}.")
    strings = _vocab_of(model, vocab, max_id)
    atomic_write_json(out / VOCAB_FILE, strings)
    hooks = []
    for spec in specs:
        codes = np.load(out / _relative(spec, "codes"), mmap_mode="r")
        offsets, positions = build_index(codes, spec.num_codes)
        np.save(out / _relative(spec, "offsets"), offsets)
        np.save(out / _relative(spec, "positions"), positions)
        hooks.append(
            {
                "name": spec.name,
                "file_id": spec.file_id,
                "n_groups": spec.n_groups,
                "k": spec.k,
                "num_codes": spec.num_codes,
                "similarity": spec.similarity,
                "dtype": spec.dtype.name,
                "has_scores": scores,
                "index_dtype": positions.dtype.name,
                "index_positions": int(positions.size),
            }
        )
    manifest = {
        "format_version": FORMAT_VERSION,
        "complete": True,
        "model_name": model_name_of(model),
        "model_fingerprint": model_fingerprint(model),
        "n_seq": n_seq,
        "seq_len": seq_len,
        "n_tokens": n_seq * seq_len,
        "token_dtype": TOKEN_DTYPE.name,
        "vocab_size": len(strings),
        "hooks": hooks,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "shards": shards,
    }
    atomic_write_json(out / MANIFEST, manifest)


def _read_manifest(path: Path) -> dict[str, Any]:
    if not path.is_dir():
        interrupted = list(path.parent.glob(f"{TEMP_PREFIX}{path.name}-*"))
        hint = (
            " (a build of it was interrupted: its leftovers "
            f"{', '.join(repr(p.name) for p in interrupted)} are not a cache; build it again)"
            if interrupted
            else ""
        )
        raise CodeCacheError(f"There is no code cache at {str(path)!r}{hint}.")
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise CodeCacheError(
            f"{str(path)!r} is not a code cache: it has no {MANIFEST} (build one with "
            "CodeCache.build or `tl-codebook cache`)."
        )
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise CodeCacheError(
            f"The code cache manifest {str(manifest_path)!r} is unreadable: {err}"
        ) from err
    if not isinstance(manifest, dict) or manifest.get("complete") is not True:
        raise CodeCacheError(
            f"The code cache at {str(path)!r} is incomplete (its build did not finish); build "
            "it again."
        )
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise CodeCacheError(
            f"The code cache at {str(path)!r} has format_version {version!r}; this version of "
            f"tl_codebook reads format_version {FORMAT_VERSION} only; rebuild the cache."
        )
    required = ("model_name", "model_fingerprint", "n_seq", "seq_len", "n_tokens", "hooks")
    missing = [key for key in required if key not in manifest]
    if missing:
        raise CodeCacheError(f"The code cache manifest {str(manifest_path)!r} lacks {missing}.")
    return manifest


def _load(path: Path, relative: str, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    """One array file memory-mapped, refused with the file's name when missing, truncated or
    not of the shape and dtype the manifest records."""
    file = path / relative
    try:
        array = np.load(file, mmap_mode="r")
    except FileNotFoundError as err:
        raise CodeCacheError(f"The code cache at {str(path)!r} lacks {relative}.") from err
    except (OSError, ValueError) as err:
        raise CodeCacheError(
            f"The code cache file {str(file)!r} is truncated or damaged ({err}); build the "
            "cache again."
        ) from err
    if tuple(array.shape) != tuple(shape) or array.dtype != dtype:
        raise CodeCacheError(
            f"The code cache file {str(file)!r} holds {array.dtype}{list(array.shape)}, but "
            f"its manifest records {dtype}{list(shape)}; build the cache again."
        )
    return array
