"""A tracr-compiled attention-only transformer with a designed two-head circuit and distractors.

The model is compiled from RASP with tracr (DeepMind's RASP-to-transformer compiler,
`pip install tracr-pypi`) and converted to a TransformerLens `HookedTransformer`; the converted
weights ship with the package (`weights/compiled_two_back.safetensors` + `.json`), so neither the
task nor its tests need jax or tracr. `convert_tracr_two_back` is the conversion, rerun it to
rebuild the files.

**Programs.** Two RASP programs over the same tokens, compiled separately (two layers each, no
MLP: tracr compiled their MLP blocks to zero weights, which are dropped) and placed side by side in
one residual stream (the two residual spaces are concatenated, so the programs never interact):

tracr's `indices` count from the first token after BOS (index i sits at position i + 1), and the
model is compiled causal, as TransformerLens runs it.

* the circuit, `two_back` (the token two positions back)::

      prev     = Aggregate(Select(indices, indices, k == q - 1), tokens)   # layer 0, head 0
      two_back = Aggregate(Select(indices, indices, k == q - 1), prev)     # layer 1, head 1

  L0H0 copies the previous token into the `prev` subspace; L1H1 attends to the previous position
  and reads `prev` there through its value input (V-composition), writing the token two back into
  the `two_back` subspace, the only one the unembedding reads. Circuit: L0H0 -> L1H1 -> logits,
  plus the embeddings into both (tokens into L0H0's values, positions into both heads' queries and
  keys).

* the distractors, `ctx` (a second program output the unembedding does not read)::

      d0 = Aggregate(Select(indices, indices, k == q % 3), tokens)         # layer 0, head 1
      d1 = Aggregate(Select(indices, indices, k == q - 1), d0)             # layer 1, head 0

  L0H1 copies one of the three context tokens (cycling with the position) and L1H0 reads that
  head's output at the previous position; both write real, input-dependent outputs into their
  own subspaces, which the unembedding ignores. The distractor edge L0H1 -> L1H0 is real, too.

**Prompts.** `BOS, c c c, t t t t t t t t` (12 positions): three context tokens drawn from
`c0..c3`, then eight task tokens. The task acts at positions 6..11, where the token two back is a
task token (`positions` marks them). Clean prompts draw task tokens from `a0..a5`; each
corrupted prompt is its clean prompt with every task token `aj` replaced by its partner `bj` and
the context kept, so the circuit copies `bj` where it copied `aj`, while the distractors, which
read only the context (up to the < 1e-4 softmax leak below), give the same output on both. The
negatives are the corrupted prompts (the default): the circuit heads' outputs live on the `a`
directions for clean prompts and on the `b` directions for negatives, the distractors' do not
move.

**Metric.** Mean over the task positions of `logit[answer] - logit[partner(answer)]`, where the
answer is the clean token two back and its partner is the corrupted prompt's answer: about +5
on clean prompts, -5 on corrupted ones, exactly 0 with either circuit head zero-ablated.

**Attention strength.** tracr scores a matching key 100 and the BOS key 50 (its "no match"
default) with everything else 0, so its softmax is saturated. The conversion multiplies every
query weight so that matches score 6, BOS 3, others 0, which still puts about 0.93 of the
attention on the matching key (the argmax output equals the reference program's on every input,
see `reference_two_back`), while leaving softmax gradients clearly nonzero for attribution
methods. The distractor heads are rescaled to score 12 (BOS 6): they carry no gradient to the
metric anyway, and the sharper softmax keeps what they leak from the task tokens (the only part
of their input that differs between clean and negative prompts) below 1e-4. The unembedding is
scaled by 6 so that logit differences are a few units. All biases are zero (tracr's are).

**tracr quirk.** tracr-pypi 1.0.0 sizes heads by their query/key space only and fails to assemble
a head with a larger value space (here 16 token values over 11 positions); the conversion patches
its head size to cover both (`_patch_tracr_key_size`).
"""

from __future__ import annotations

import json
import re
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jaxtyping import Float, Int
from safetensors.torch import load_file
from torch import Tensor
from transformer_lens import HookedTransformer, HookedTransformerConfig

from tl_codebook.comparisons.circuits.task import (
    INPUT,
    LOGITS,
    CircuitTask,
    edge_name,
    head_name,
)

__all__ = [
    "COMPILED_PROGRAMS",
    "compiled_task",
    "convert_tracr_two_back",
    "load_compiled_model",
    "reference_distractors",
    "reference_two_back",
]

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
"""Where the converted weights ship: `compiled_<program>.safetensors` and `.json`."""

COMPILED_PROGRAMS = ("two_back",)
"""The compiled programs this module ships weights for."""

CONTEXT_LEN = 3
"""Context tokens after BOS (what the distractors read)."""
TASK_LEN = 8
"""Task tokens after the context (what the circuit reads)."""
SEQ_LEN = 1 + CONTEXT_LEN + TASK_LEN
"""Prompt length, BOS included (the model's n_ctx)."""
N_PAIRS = 6
"""Number of clean task tokens `a0..` (and of their corrupted partners `b0..`)."""
N_CONTEXT = 4
"""Number of context tokens `c0..`."""
FIRST_TASK_POSITION = 1 + CONTEXT_LEN + 2
"""The first position whose token two back is a task token."""

MATCH_SCORE = 6.0
"""Attention score of a matching key after the conversion (tracr's is 100, BOS's half of it)."""
DISTRACTOR_MATCH_SCORE = 12.0
"""The same for the distractor heads: sharper, so that what they leak from the task tokens
(which differ between clean and negative prompts) is below 1e-4."""
TRACR_COLDNESS = 100.0
"""tracr's categorical-attention score of a match (its softmax coldness)."""
LOGIT_SCALE = 6.0
"""Factor on the unembedding (tracr's output subspace has unit-size one-hot entries)."""

_CIRCUIT_SLOTS = {"prev": (0, 0), "two_back": (1, 1)}
_DISTRACTOR_SLOTS = {"d0": (0, 1), "d1": (1, 0)}
BOS = "BOS"
"""tracr's beginning-of-sequence token (always at position 0)."""


def _vocab() -> list[str]:
    a = [f"a{j}" for j in range(N_PAIRS)]
    b = [f"b{j}" for j in range(N_PAIRS)]
    c = [f"c{j}" for j in range(N_CONTEXT)]
    return a + b + c


def _tracr_programs() -> dict[str, Any]:
    """The two RASP programs (needs tracr)."""
    from tracr.rasp import rasp

    prev_sel = rasp.Select(rasp.indices, rasp.indices, lambda k, q: k == q - 1)
    prev = rasp.categorical(rasp.Aggregate(prev_sel, rasp.tokens)).named("prev")
    two_back = rasp.categorical(rasp.Aggregate(prev_sel, prev)).named("two_back")
    ctx_sel = rasp.Select(rasp.indices, rasp.indices, lambda k, q: k == q % CONTEXT_LEN)
    d0 = rasp.categorical(rasp.Aggregate(ctx_sel, rasp.tokens)).named("d0")
    d1 = rasp.categorical(rasp.Aggregate(prev_sel, d0)).named("d1")
    return {"two_back": two_back, "ctx": d1}


def convert_tracr_two_back(
    out_dir: str | Path | None = None, n_check: int = 300, seed: int = 0
) -> Path:
    """Compile the `two_back` and `ctx` RASP programs with tracr, convert them to one
    TransformerLens model and write `compiled_two_back.safetensors` + `.json` to `out_dir`.

    Why: the shipped weights must be reproducible from the RASP source. Needs `tracr` (and jax,
    dm-haiku) importable, e.g. `pip install tracr-pypi` in a separate environment whose
    site-packages are put on `sys.path`; the package itself never imports tracr. The conversion
    is checked before writing: on `n_check` random token sequences the converted model's argmax
    output must equal tracr's own compiled model's on every defined position, for the circuit
    program (through the logits) and for the distractor program (through its residual subspace).

    Returns:
        The path of the written `.safetensors` file.
    """
    try:
        from tracr.compiler import compiling
    except ImportError as err:  # pragma: no cover - only for rebuilding the weights
        raise ImportError(
            "convert_tracr_two_back needs tracr: `pip install tracr-pypi` (with jax, dm-haiku)."
        ) from err

    _patch_tracr_key_size()
    out = Path(out_dir) if out_dir is not None else WEIGHTS_DIR
    vocab = _vocab()
    compiled = {
        name: compiling.compile_rasp_to_model(
            program,
            vocab=set(vocab),
            max_seq_len=SEQ_LEN - 1,
            compiler_bos=BOS,
            causal=True,
        )
        for name, program in _tracr_programs().items()
    }
    encoders = [m.input_encoder.encoding_map for m in compiled.values()]
    if any(enc != encoders[0] for enc in encoders):
        raise RuntimeError("tracr gave the two programs different token encodings.")
    encoding: dict[str, int] = encoders[0]
    token_names = sorted(encoding, key=encoding.__getitem__)

    # residual layout: the two programs' residual spaces, concatenated
    offsets: dict[str, int] = {}
    labels: list[str] = []
    for name, m in compiled.items():
        offsets[name] = len(labels)
        labels.extend(f"{name}/{label}" for label in m.residual_labels)
    d_model = len(labels)
    d_head = max(int(m.model_config.key_size) for m in compiled.values())
    n_vocab = len(token_names)

    def block(name: str, param: str) -> tuple[np.ndarray, int]:
        params = compiled[name].params
        return np.asarray(params[param]["embeddings" if "embed" in param else "w"]), offsets[name]

    w_e = np.zeros((n_vocab, d_model), np.float32)
    w_pos = np.zeros((SEQ_LEN, d_model), np.float32)
    for name, m in compiled.items():
        emb, off = block(name, "token_embed")
        w_e[:, off : off + emb.shape[1]] = emb
        pos, off = block(name, "pos_embed")
        w_pos[:, off : off + pos.shape[1]] = pos
        for layer_name, param in m.params.items():
            if "mlp" in layer_name and np.abs(np.asarray(param["w"])).max() > 0:
                raise RuntimeError(
                    f"{name}: {layer_name} is not zero; the model must be attn-only."
                )
            if "b" in param and np.abs(np.asarray(param["b"])).max() > 0:
                raise RuntimeError(f"{name}: {layer_name} has a bias; the conversion drops them.")

    state: dict[str, np.ndarray] = {"embed.W_E": w_e, "pos_embed.W_pos": w_pos}
    program_of = {"prev": "two_back", "two_back": "two_back", "d0": "ctx", "d1": "ctx"}
    slots = {**_CIRCUIT_SLOTS, **_DISTRACTOR_SLOTS}
    for layer in range(2):
        mats = {k: np.zeros((2, d_model, d_head), np.float32) for k in ("W_Q", "W_K", "W_V")}
        w_o = np.zeros((2, d_head, d_model), np.float32)
        for sop, (sop_layer, head) in slots.items():
            if sop_layer != layer:
                continue
            name = program_of[sop]
            prefix = f"transformer/layer_{layer}/attn/"
            off = offsets[name]
            for key, tr in (("W_Q", "query"), ("W_K", "key"), ("W_V", "value")):
                w, _ = block(name, prefix + tr)
                # tracr's scores are coldness * match / sqrt(key_size), TL's q.k / sqrt(d_head)
                score = MATCH_SCORE if sop in _CIRCUIT_SLOTS else DISTRACTOR_MATCH_SCORE
                scale = score * np.sqrt(d_head) / TRACR_COLDNESS if key == "W_Q" else 1.0
                mats[key][head, off : off + w.shape[0], : w.shape[1]] = scale * w
            w, _ = block(name, prefix + "linear")
            w_o[head, : w.shape[0], off : off + w.shape[1]] = w
        for key, value in mats.items():
            state[f"blocks.{layer}.attn.{key}"] = value
        state[f"blocks.{layer}.attn.W_O"] = w_o

    # subspaces (residual indices and the values they encode) of every program output
    spaces: dict[str, dict[str, list]] = {}
    for name, m in compiled.items():
        for i, label in enumerate(m.residual_labels):
            sop_label, _, value = label.partition(":")
            if sop_label in ("tokens", "indices", "one"):
                continue
            space = spaces.setdefault(re.sub(r"_\d+$", "", sop_label), {"index": [], "value": []})
            space["index"].append(offsets[name] + i)
            space["value"].append(value)
    w_u = np.zeros((d_model, n_vocab), np.float32)
    for index, value in zip(spaces["two_back"]["index"], spaces["two_back"]["value"]):
        w_u[index, encoding[value]] = LOGIT_SCALE
    state["unembed.W_U"] = w_u

    config = {
        "n_layers": 2,
        "n_heads": 2,
        "d_model": d_model,
        "d_head": d_head,
        "n_ctx": SEQ_LEN,
        "d_vocab": n_vocab,
        "d_vocab_out": n_vocab,
    }
    meta = {
        "program": "two_back",
        "config": config,
        "tokens": token_names,
        "residual_labels": labels,
        "spaces": spaces,
        "circuit_slots": _CIRCUIT_SLOTS,
        "distractor_slots": _DISTRACTOR_SLOTS,
        "match_score": MATCH_SCORE,
        "distractor_match_score": DISTRACTOR_MATCH_SCORE,
        "logit_scale": LOGIT_SCALE,
        "source": "tracr-pypi " + _tracr_version(),
    }
    model = _build_model(config, {k: torch.from_numpy(v) for k, v in state.items()})

    rng = np.random.default_rng(seed)
    plain = [t for t in token_names if t not in (BOS, "compiler_pad")]
    for _ in range(n_check):
        seq = [BOS] + list(rng.choice(plain, SEQ_LEN - 1))
        ids = torch.tensor([[encoding[t] for t in seq]])
        with torch.no_grad():
            logits, cache = model.run_with_cache(ids)
        resid = cache["resid_post", 1][0]
        references = {
            "two_back": reference_two_back(seq),
            "d0": reference_distractors(seq)[0],
            "d1": reference_distractors(seq)[1],
        }
        for name, sop, read in (
            ("two_back", "two_back", logits[0]),
            ("ctx", "d0", resid[:, spaces["d0"]["index"]]),
            ("ctx", "d1", resid[:, spaces["d1"]["index"]]),
        ):
            ref = references[sop]
            tracr_out = compiled[name].apply(seq).decoded if sop != "d0" else ref
            for q in range(1, SEQ_LEN):
                if ref[q] is None:
                    continue
                got = int(read[q].argmax())
                got_value = token_names[got] if sop == "two_back" else spaces[sop]["value"][got]
                if not (got_value == tracr_out[q] == ref[q]):
                    raise RuntimeError(
                        f"conversion mismatch on {seq} at {q} ({sop}): TL {got_value}, "
                        f"tracr {tracr_out[q]}, reference {ref[q]}."
                    )

    out.mkdir(parents=True, exist_ok=True)
    from safetensors.numpy import save_file

    path = out / "compiled_two_back.safetensors"
    save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, str(path))
    (out / "compiled_two_back.json").write_text(json.dumps(meta, indent=1) + "\n")
    return path


def _patch_tracr_key_size() -> None:
    """tracr-pypi 1.0.0 sizes every head by its query/key space only, so a head whose value space
    is larger (here: values are the 18 tokens, queries the 12 positions) fails to assemble. Make
    the head size the largest of both, as upstream tracr later did."""
    import dataclasses as dc

    from tracr.compiler import assemble

    original = assemble._get_model_config_and_module_names
    if getattr(original, "_tl_codebook_patched", False):
        return

    def patched(craft_model):  # type: ignore[no-untyped-def]
        config, names = original(craft_model)
        heads = [
            head
            for block in craft_model.blocks
            if not hasattr(block, "fst")
            for head in block.as_multi().heads()
        ]
        size = max([config.key_size] + [max(h.w_ov.matrix.shape) for h in heads])
        return dc.replace(config, key_size=size), names

    patched._tl_codebook_patched = True  # type: ignore[attr-defined]
    assemble._get_model_config_and_module_names = patched


def _tracr_version() -> str:
    try:
        from importlib.metadata import version

        return version("tracr-pypi")
    except Exception:  # pragma: no cover
        return "unknown"


def _build_model(config: dict[str, Any], state: dict[str, Tensor]) -> HookedTransformer:
    cfg = HookedTransformerConfig(
        **config,
        attn_only=True,
        normalization_type=None,
        act_fn="relu",
        positional_embedding_type="standard",
        default_prepend_bos=False,
        device="cpu",
        seed=0,
    )
    model = HookedTransformer(cfg)
    full = {}
    for key, value in model.state_dict().items():
        if key in state:
            full[key] = state[key].to(value.dtype)
        elif key.split(".")[-1] in ("b_Q", "b_K", "b_V", "b_O", "b_U"):
            full[key] = torch.zeros_like(value)
        else:
            full[key] = value
    model.load_state_dict(full)
    model.eval()
    return model


@cache
def _load(program: str) -> tuple[dict[str, Tensor], str]:
    if program not in COMPILED_PROGRAMS:
        raise ValueError(
            f"unknown compiled program {program!r}; the shipped ones are {list(COMPILED_PROGRAMS)}."
        )
    stem = WEIGHTS_DIR / f"compiled_{program}"
    return load_file(str(stem.with_suffix(".safetensors"))), stem.with_suffix(".json").read_text()


def load_compiled_model(program: str = "two_back") -> tuple[HookedTransformer, dict[str, Any]]:
    """The shipped compiled model of `program` and its metadata (token names, residual labels,
    program-output subspaces, head slots), loaded from the package's safetensors + JSON files.

    Why: the tasks and tests use the converted tracr model without jax. A fresh model is built on
    every call, so callers may set hooks and options freely. Inputs must start with the BOS token
    at position 0 (tracr's attention defaults to it) and be at most 12 tokens long.

    Raises:
        ValueError: for a program not in `COMPILED_PROGRAMS`.
    """
    state, meta_text = _load(program)
    meta = json.loads(meta_text)
    return _build_model(meta["config"], state), meta


def reference_two_back(tokens: list[str]) -> list[str | None]:
    """The circuit program in plain Python: at position q the token at q - 2, where tracr's
    program defines it (q >= 3, since position 0 holds BOS), None elsewhere."""
    return [tokens[q - 2] if q >= 3 else None for q in range(len(tokens))]


def reference_distractors(tokens: list[str]) -> tuple[list[str | None], list[str | None]]:
    """The distractor program in plain Python, on a sequence with BOS at position 0: with
    tracr's indices (i = q - 1, counted from the first token after BOS), `d0[q]` = the context
    token at tracr index i % 3 (position i % 3 + 1), `d1[q]` = `d0[q - 1]`; None at BOS and
    where the program reads BOS."""
    d0: list[str | None] = [None] + [
        tokens[(q - 1) % CONTEXT_LEN + 1] for q in range(1, len(tokens))
    ]
    d1 = [None] + d0[:-1]
    return d0, d1


def _partner_ids(tokens: list[str]) -> Int[Tensor, " d_vocab"]:
    index = {t: i for i, t in enumerate(tokens)}
    partner = torch.arange(len(tokens))
    for j in range(N_PAIRS):
        partner[index[f"a{j}"]] = index[f"b{j}"]
        partner[index[f"b{j}"]] = index[f"a{j}"]
    return partner


def compiled_task(n_prompts: int = 50, seed: int = 0) -> CircuitTask:
    """The "compiled_two_back" task: the tracr-compiled model (see the module docstring), `n`
    clean prompts, their corrupted partners (task tokens a_j -> b_j, context kept), a
    logit-difference metric at positions 6..11 and the designed circuit as the truth.

    Why: unlike a trained model, a compiled one has a circuit fixed by construction (L0H0 ->
    L1H1, with active distractors L0H1 -> L1H0 beside it), so circuit-discovery methods can be
    scored against a known answer. The same seed gives the same prompts.

    Raises:
        ValueError: for `n_prompts` < 1.
    """
    if n_prompts < 1:
        raise ValueError(f"n_prompts must be >= 1, got {n_prompts}.")
    model, meta = load_compiled_model("two_back")
    tokens: list[str] = meta["tokens"]
    index = {t: i for i, t in enumerate(tokens)}
    a_ids = torch.tensor([index[f"a{j}"] for j in range(N_PAIRS)])
    c_ids = torch.tensor([index[f"c{j}"] for j in range(N_CONTEXT)])
    partner = _partner_ids(tokens)

    gen = torch.Generator().manual_seed(seed)
    context = c_ids[torch.randint(0, N_CONTEXT, (n_prompts, CONTEXT_LEN), generator=gen)]
    task = a_ids[torch.randint(0, N_PAIRS, (n_prompts, TASK_LEN), generator=gen)]
    bos = torch.full((n_prompts, 1), index[BOS])
    clean = torch.cat([bos, context, task], dim=1)
    corrupted = torch.cat([bos, context, partner[task]], dim=1)
    positions = torch.zeros(n_prompts, SEQ_LEN, dtype=torch.bool)
    positions[:, FIRST_TASK_POSITION:] = True

    def metric(
        logits: Float[Tensor, "n pos d_vocab"], clean_tokens: Int[Tensor, "n pos"]
    ) -> Float[Tensor, " n"]:
        answer = clean_tokens[:, FIRST_TASK_POSITION - 2 : -2]
        other = partner.to(answer.device)[answer]
        at = logits[:, FIRST_TASK_POSITION:]
        right = at.gather(-1, answer.unsqueeze(-1)).squeeze(-1)
        wrong = at.gather(-1, other.unsqueeze(-1)).squeeze(-1)
        return (right - wrong).mean(dim=-1)

    circuit = [head_name(*_CIRCUIT_SLOTS["prev"]), head_name(*_CIRCUIT_SLOTS["two_back"])]
    prev_head, two_back_head = circuit
    return CircuitTask(
        name="compiled_two_back",
        model=model,
        clean=clean,
        corrupted=corrupted,
        metric=metric,
        true_nodes=frozenset(circuit),
        true_edges=frozenset(
            {
                edge_name(INPUT, prev_head),
                edge_name(INPUT, two_back_head),
                edge_name(prev_head, two_back_head),
                edge_name(two_back_head, LOGITS),
            }
        ),
        negatives=None,
        positions=positions,
        notes={
            "source": f"compiled with {meta['source']} from RASP, converted to TransformerLens",
            "program": "two_back[q] = tokens[q-2] (prev = Aggregate(prev-select, tokens); "
            "two_back = Aggregate(prev-select, prev))",
            "circuit": f"{prev_head} copies the previous token; {two_back_head} reads it one "
            "position back (V-composition) and writes the answer, the only subspace W_U reads",
            "distractors": "L0H1 copies a context token, L1H0 reads L0H1 one position back; "
            "their subspaces are not read by W_U or by the circuit heads",
            "negatives": "the corrupted prompts: task tokens a_j -> b_j, context identical, so "
            "distractor outputs are identical and circuit outputs move to the b directions",
            "attention": f"tracr's query weights rescaled: match score {MATCH_SCORE:g}, BOS "
            f"{MATCH_SCORE / 2:g}, other keys 0 in the circuit heads, "
            f"{DISTRACTOR_MATCH_SCORE:g}/{DISTRACTOR_MATCH_SCORE / 2:g}/0 in the distractors "
            "(tracr: 100, 50, 0)",
        },
    )
