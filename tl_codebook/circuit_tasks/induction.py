"""An induction task whose true circuit is known: a small attention-only model trained here.

The model is a 2-layer, 4-heads-per-layer attention-only `HookedTransformer` trained on a
mixture of two tasks, told apart by the first token:

- **repeat** (first token `BOS`): random content tokens in which a segment of random length
  (4 to 20 tokens, varied per sequence so no fixed-offset positional shortcut works) repeats
  until the end of the context; the target is the next token. Only induction (a previous-token
  head composed with an induction head) predicts the repeats.
- **skip-bigram** (first token `MARKER`): random content tokens; the target at position t
  (t >= 2) is `perm[x_{t-1}]` for a fixed random permutation `perm` of the content tokens (the
  targets are labels, not the next tokens). It needs attention to the previous token and a
  token-to-token map, but no induction: it gives heads work of their own, so that some lie
  outside the induction circuit, and its previous-token gradient also gets layer-0
  previous-token heads going early, which shortens the induction plateau.

The ground truth of `induction_task` is fixed from attention patterns alone (see
`induction_truth`), then checked against behaviour by mean-ablation (see
`induction_ablation_check`); no circuit method takes part.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from safetensors.torch import load_file, save_file
from torch import Tensor
from transformer_lens import HookedTransformer, HookedTransformerConfig

from tl_codebook.comparisons.circuits.task import (
    INPUT,
    LOGITS,
    CircuitTask,
    edge_name,
    head_name,
    model_heads,
)

__all__ = [
    "BOS",
    "MARKER",
    "FIRST_CONTENT_TOKEN",
    "D_VOCAB",
    "N_CTX",
    "HALF_LENGTH",
    "PREV_TOKEN_THRESHOLD",
    "INDUCTION_THRESHOLD",
    "BEHAVIOUR_OUTSIDE",
    "BEHAVIOUR_INSIDE",
    "WEIGHTS_DIR",
    "induction_config",
    "train_induction_model",
    "save_induction_model",
    "load_induction_model",
    "shipped_seeds",
    "induction_prompts",
    "induction_metric",
    "repeat_positions",
    "head_scores",
    "induction_truth",
    "repeat_loss",
    "induction_ablation_check",
    "induction_task",
]

D_VOCAB = 64
"""Vocabulary size: `BOS`, `MARKER`, then 62 content tokens."""
BOS = 0
"""First token of a repeat-task sequence (and of every prompt of `induction_task`)."""
MARKER = 1
"""First token of a skip-bigram sequence: the other task's marker, never in the prompts."""
FIRST_CONTENT_TOKEN = 2
"""Content tokens are `FIRST_CONTENT_TOKEN .. D_VOCAB - 1`."""
N_CTX = 48
"""Context length the models are trained at."""
HALF_LENGTH = 20
"""Length of each half of an `induction_task` prompt (BOS + 20 tokens + the same 20 again)."""
PREV_TOKEN_THRESHOLD = 0.4
"""A head is a previous-token head when its mean attention from t to t-1 is at least this.
Uniform causal attention over the prompt would give about 0.1 on average; 0.4 means the head
puts the largest share of its attention on the previous token."""
INDUCTION_THRESHOLD = 0.3
"""A head is an induction head when its mean attention, from a repeated-half position, to the
token right after the earlier occurrence of the current token is at least this (about 0.03
under uniform attention over 20-40 positions, 10 times less)."""
WEIGHTS_DIR = Path(__file__).parent / "weights"
"""Where the shipped `induction_seed{s}.safetensors` + `.json` live."""

_N_LAYERS, _N_HEADS, _D_MODEL = 2, 4, 64
_MIN_SEGMENT, _MAX_SEGMENT = 4, 20
_POS_INIT_SCALE = 0.3


def induction_config(seed: int = 0) -> HookedTransformerConfig:
    """The attention-only model's config: 2 layers x 4 heads, d_model 64, LayerNorm, learned
    ("standard") positional embeddings, `D_VOCAB` tokens, `N_CTX` positions."""
    return HookedTransformerConfig(
        n_layers=_N_LAYERS,
        d_model=_D_MODEL,
        n_heads=_N_HEADS,
        d_head=_D_MODEL // _N_HEADS,
        n_ctx=N_CTX,
        d_vocab=D_VOCAB,
        attn_only=True,
        normalization_type="LN",
        positional_embedding_type="standard",
        seed=seed,
        device="cpu",
    )


def _skip_permutation(seed: int) -> Int[Tensor, " d_vocab"]:
    """The skip-bigram task's map token -> label (a random permutation of content tokens)."""
    g = torch.Generator().manual_seed(10_000 + seed)
    full = torch.arange(D_VOCAB)
    full[FIRST_CONTENT_TOKEN:] = (
        torch.randperm(D_VOCAB - FIRST_CONTENT_TOKEN, generator=g) + FIRST_CONTENT_TOKEN
    )
    return full


def _repeat_batch(b: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
    toks = torch.randint(FIRST_CONTENT_TOKEN, D_VOCAB, (b, N_CTX), generator=g)
    toks[:, 0] = BOS
    for i in range(b):
        length = int(torch.randint(_MIN_SEGMENT, _MAX_SEGMENT + 1, (1,), generator=g))
        prefix = int(torch.randint(0, N_CTX - 1 - 2 * length + 1, (1,), generator=g))
        seg = toks[i, 1 + prefix : 1 + prefix + length].clone()
        pos = 1 + prefix + length
        while pos < N_CTX:
            n = min(length, N_CTX - pos)
            toks[i, pos : pos + n] = seg[:n]
            pos += n
    return toks[:, :-1], toks[:, 1:]


def _skip_batch(b: int, g: torch.Generator, perm: Tensor) -> tuple[Tensor, Tensor]:
    toks = torch.randint(FIRST_CONTENT_TOKEN, D_VOCAB, (b, N_CTX - 1), generator=g)
    toks[:, 0] = MARKER
    targets = torch.cat([torch.full((b, 2), -100), perm[toks[:, 1:-1]]], dim=1)
    return toks, targets


def _sinusoid(n_ctx: int, d_model: int) -> Tensor:
    pos = torch.arange(n_ctx, dtype=torch.float32)[:, None]
    div = torch.exp(-math.log(10_000.0) * torch.arange(0, d_model, 2).float() / d_model)
    pe = torch.zeros(n_ctx, d_model)
    pe[:, 0::2] = torch.sin(pos * div)
    pe[:, 1::2] = torch.cos(pos * div)
    return pe


def train_induction_model(
    seed: int,
    steps: int = 4000,
    batch_size: int = 64,
    lr: float = 3e-3,
    other_fraction: float = 0.3,
    n_threads: int | None = None,
    log_every: int = 0,
) -> HookedTransformer:
    """Train the task's attention-only model from scratch, reproducibly from `seed`.

    Every random draw (weights through `cfg.seed`, data through its own `torch.Generator`) is
    seeded, so a seed gives the same model on the same machine and torch build. The learned
    positional embedding starts as 0.3 x sinusoids (then trains freely): it makes "attend to
    t-1" easy to find, which is what the induction phase change waits for. `other_fraction` of
    each batch is the skip-bigram task (see the module docstring); the rest repeats.

    Raises:
        ValueError: for `steps` or `batch_size` below 1 or `other_fraction` outside [0, 1).
    """
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be >= 1, got {steps} and {batch_size}.")
    if not 0.0 <= other_fraction < 1.0:
        raise ValueError(f"other_fraction must be in [0, 1), got {other_fraction}.")
    if n_threads is not None:
        torch.set_num_threads(n_threads)
    torch.manual_seed(seed)
    model = HookedTransformer(induction_config(seed))
    with torch.no_grad():
        model.pos_embed.W_pos.copy_(_POS_INIT_SCALE * _sinusoid(N_CTX, _D_MODEL))
    g = torch.Generator().manual_seed(seed + 1000)
    perm = _skip_permutation(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    n_other = int(batch_size * other_fraction)
    start = time.time()
    for step in range(steps):
        x1, y1 = _repeat_batch(batch_size - n_other, g)
        x2, y2 = _skip_batch(n_other, g, perm)
        x, y = torch.cat([x1, x2]), torch.cat([y1, y2])
        logits = model(x)
        loss = F.cross_entropy(logits.reshape(-1, D_VOCAB), y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if log_every and step % log_every == 0:
            print(f"step {step} loss {loss.item():.3f} {time.time() - start:.0f}s", flush=True)
    model.eval()
    return model


def save_induction_model(
    model: HookedTransformer, seed: int, settings: dict, directory: Path | None = None
) -> Path:
    """Write `induction_seed{seed}.safetensors` (the state dict, no pickle) and `.json` (the
    config fields `load_induction_model` rebuilds from, plus `settings`, the training settings)
    into `directory` (default `WEIGHTS_DIR`); returns the safetensors path."""
    directory = WEIGHTS_DIR if directory is None else Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    path = directory / f"induction_seed{seed}.safetensors"
    save_file(state, str(path))
    cfg = model.cfg
    fields = dict(
        n_layers=cfg.n_layers,
        d_model=cfg.d_model,
        n_heads=cfg.n_heads,
        d_head=cfg.d_head,
        n_ctx=cfg.n_ctx,
        d_vocab=cfg.d_vocab,
        attn_only=True,
        normalization_type=cfg.normalization_type,
        positional_embedding_type=cfg.positional_embedding_type,
    )
    meta = {"config": fields, "training": {"seed": seed, **settings}}
    (directory / f"induction_seed{seed}.json").write_text(json.dumps(meta, indent=2) + "\n")
    return path


def shipped_seeds(directory: Path | None = None) -> list[int]:
    """The seeds with shipped weights (both the .safetensors and the .json present)."""
    directory = WEIGHTS_DIR if directory is None else Path(directory)
    seeds = []
    for path in directory.glob("induction_seed*.safetensors"):
        tail = path.stem.removeprefix("induction_seed")
        if tail.isdigit() and path.with_suffix(".json").exists():
            seeds.append(int(tail))
    return sorted(seeds)


def load_induction_model(seed: int, directory: Path | None = None) -> HookedTransformer:
    """Rebuild the shipped model of `seed` from its .json config and .safetensors weights.

    Raises:
        ValueError: for a seed without shipped weights (the message lists the shipped seeds).
    """
    directory = WEIGHTS_DIR if directory is None else Path(directory)
    seeds = shipped_seeds(directory)
    if seed not in seeds:
        raise ValueError(
            f"no shipped induction model for seed {seed!r} in {directory}; shipped seeds: "
            f"{seeds}. Train one with train_induction_model({seed})."
        )
    meta = json.loads((directory / f"induction_seed{seed}.json").read_text())
    cfg = HookedTransformerConfig(**meta["config"], seed=seed, device="cpu")
    model = HookedTransformer(cfg)
    model.load_state_dict(load_file(str(directory / f"induction_seed{seed}.safetensors")))
    model.eval()
    return model


def induction_prompts(
    n: int, half: int = HALF_LENGTH, seed: int = 1234
) -> tuple[Int[Tensor, "n pos"], Int[Tensor, "n pos"]]:
    """`n` clean and corrupted prompt pairs, each `BOS` + `half` tokens + a second half.

    Clean: the second half repeats the first. Corrupted: the same first half, then `half`
    fresh tokens none of which occurs in the first half (so nothing repeats). Tokens are
    content tokens, distinct within each half. Same `seed`, same prompts.

    Raises:
        ValueError: for `n` < 1 or a `half` that does not fit (2 <= half, 2 * half < `N_CTX`).
    """
    n_content = D_VOCAB - FIRST_CONTENT_TOKEN
    if n < 1 or not 2 <= half or 2 * half + 1 > N_CTX or 2 * half > n_content:
        raise ValueError(
            f"need n >= 1 and 2 <= half <= {(N_CTX - 1) // 2}; got n={n}, half={half}."
        )
    g = torch.Generator().manual_seed(seed)
    clean, corrupted = [], []
    bos = torch.tensor([BOS])
    for _ in range(n):
        perm = torch.randperm(n_content, generator=g) + FIRST_CONTENT_TOKEN
        first, fresh = perm[:half], perm[half : 2 * half]
        clean.append(torch.cat([bos, first, first]))
        corrupted.append(torch.cat([bos, first, fresh]))
    return torch.stack(clean), torch.stack(corrupted)


def repeat_positions(n: int, half: int = HALF_LENGTH) -> Bool[Tensor, "n pos"]:
    """True at the repeated half's positions that have a next token to predict (positions
    half+1 .. 2*half-1): where induction acts and the metric reads."""
    mask = torch.zeros(n, 2 * half + 1, dtype=torch.bool)
    mask[:, half + 1 : 2 * half] = True
    return mask


def induction_metric(
    logits: Float[Tensor, "n pos d_vocab"], tokens: Int[Tensor, "n pos"]
) -> Float[Tensor, " n"]:
    """Per prompt, the mean over the repeated half (positions half+1 .. 2*half-1, half =
    (pos-1)//2) of the log-probability of the clean next token; differentiable in `logits`."""
    half = (tokens.shape[1] - 1) // 2
    logp = logits.log_softmax(-1)[:, half + 1 : 2 * half]
    target = tokens[:, half + 2 : 2 * half + 1]
    return logp.gather(-1, target[..., None])[..., 0].mean(-1)


@torch.no_grad()
def head_scores(
    model: HookedTransformer, clean: Int[Tensor, "n pos"]
) -> dict[str, dict[str, float]]:
    """Per head, from attention patterns on repeated prompts (`BOS` + half + half):

    - "prev": mean attention from t to t-1 (t = 1 .. last);
    - "induction": mean attention from a repeated-half position q to q-half+1, the token that
      followed the earlier occurrence of the current token;
    - "duplicate": mean attention from a repeated-half position q to q-half, the earlier
      occurrence of the current token itself (a duplicate-token head; not part of the truth,
      recorded because such a head reacts to repeats without carrying the prediction);
    - "bos": mean attention to position 0 (a head's resting place when it has nothing to do).
    """
    half = (clean.shape[1] - 1) // 2
    _, cache = model.run_with_cache(clean, names_filter=lambda name: name.endswith("hook_pattern"))
    q_all = torch.arange(1, clean.shape[1])
    q_rep = torch.arange(half + 1, 2 * half + 1)
    scores = {}
    for layer in range(model.cfg.n_layers):
        pattern = cache["pattern", layer]
        for h in range(model.cfg.n_heads):
            p = pattern[:, h]
            scores[head_name(layer, h)] = {
                "prev": float(p[:, q_all, q_all - 1].mean()),
                "induction": float(p[:, q_rep, q_rep - half + 1].mean()),
                "duplicate": float(p[:, q_rep, q_rep - half].mean()),
                "bos": float(p[:, 1:, 0].mean()),
            }
    return scores


def induction_truth(
    model: HookedTransformer, clean: Int[Tensor, "n pos"]
) -> tuple[frozenset[str], frozenset[str], dict[str, object]]:
    """The true circuit from attention scores alone: (nodes, edges, notes).

    Induction heads: induction score >= `INDUCTION_THRESHOLD`, in layer >= 1 (a layer-0 head
    cannot see the previous token's identity at the key). Previous-token heads that feed them:
    prev score >= `PREV_TOKEN_THRESHOLD`, in a layer below some induction head. Edges:
    input -> each previous-token head (it reads token/position), previous-token head ->
    induction head (K-composition, for each pair with the sender in an earlier layer), input ->
    induction head (its query is the current token, its value the attended token) and induction
    head -> logits. The notes hold every head's scores and the disagreements found (an induction
    head with no earlier previous-token head, a previous-token head in the last layer, a head
    passing both thresholds).
    """
    scores = head_scores(model, clean)
    parse = {name: (int(name[1 : name.index("H")]), name) for name in scores}
    induction = sorted(
        n for n, s in scores.items() if s["induction"] >= INDUCTION_THRESHOLD and parse[n][0] >= 1
    )
    prev_all = sorted(n for n, s in scores.items() if s["prev"] >= PREV_TOKEN_THRESHOLD)
    ind_layers = [parse[n][0] for n in induction]
    feeding = sorted(n for n in prev_all if ind_layers and parse[n][0] < max(ind_layers))
    edges = set()
    for p in feeding:
        edges.add(edge_name(INPUT, p))
        for i in induction:
            if parse[p][0] < parse[i][0]:
                edges.add(edge_name(p, i))
    for i in induction:
        edges.add(edge_name(INPUT, i))
        edges.add(edge_name(i, LOGITS))
    disagreements = []
    for i in induction:
        if not any(parse[p][0] < parse[i][0] for p in feeding):
            disagreements.append(f"{i}: induction head without an earlier previous-token head")
    for p in prev_all:
        if p not in feeding:
            disagreements.append(f"{p}: previous-token head feeding no induction head (excluded)")
        if p in induction:
            disagreements.append(f"{p}: passes both thresholds")
    if not induction:
        disagreements.append("no induction head found")
    notes: dict[str, object] = {
        "head_scores": scores,
        "prev_token_threshold": PREV_TOKEN_THRESHOLD,
        "induction_threshold": INDUCTION_THRESHOLD,
        "induction_heads": induction,
        "prev_token_heads": feeding,
        "outside_circuit": [
            h for h in model_heads(model) if h not in set(induction) | set(feeding)
        ],
        "truth_disagreements": disagreements,
    }
    return frozenset(induction) | frozenset(feeding), frozenset(edges), notes


@torch.no_grad()
def repeat_loss(
    model: HookedTransformer, clean: Int[Tensor, "n pos"], ablate: list[str] | None = None
) -> tuple[float, float]:
    """(first-half loss, repeated-half loss) in nats per token on `clean`, with the heads in
    `ablate` mean-ablated (their `hook_z` replaced by its mean over prompts and positions)."""
    half = (clean.shape[1] - 1) // 2
    ablate = ablate or []
    _, cache = model.run_with_cache(clean, names_filter=lambda name: name.endswith("hook_z"))
    hooks: list[tuple[str | Callable[..., Any], Callable[..., Any]]] = []
    for name in ablate:
        layer, h = int(name[1 : name.index("H")]), int(name[name.index("H") + 1 :])
        mean = cache["z", layer][:, :, h].mean((0, 1))

        def hook(z: Tensor, hook: object, h: int = h, mean: Tensor = mean) -> Tensor:
            z[:, :, h] = mean
            return z

        hooks.append((f"blocks.{layer}.attn.hook_z", hook))
    logits = model.run_with_hooks(clean, fwd_hooks=hooks)
    nll = -logits.log_softmax(-1)[:, :-1].gather(-1, clean[:, 1:, None])[..., 0]
    return float(nll[:, 1:half].mean()), float(nll[:, half + 1 : 2 * half].mean())


BEHAVIOUR_OUTSIDE = 0.1
"""A head outside the truth whose mean-ablation alone closes at least this share of the
repeated half's loss gap is reported as a disagreement between attention scores and behaviour."""
BEHAVIOUR_INSIDE = 0.02
"""A head in the truth whose mean-ablation alone closes less than this share is reported too."""


def induction_ablation_check(
    model: HookedTransformer, clean: Int[Tensor, "n pos"], true_nodes: frozenset[str]
) -> dict[str, object]:
    """The truth's behavioural check (not a circuit method): repeated-half loss with nothing,
    the true induction heads, the true previous-token heads, or every head outside the truth
    mean-ablated, plus each head alone. "holds" is True when ablating the induction heads
    closes at least half the gap between the repeated and the first half's loss, and ablating
    all heads outside the truth closes less than a fifth of it. "behaviour_disagreements" lists
    the heads whose own ablation contradicts the attention-score truth (see `BEHAVIOUR_OUTSIDE`,
    `BEHAVIOUR_INSIDE`)."""
    first, rep = repeat_loss(model, clean)
    induction = sorted(h for h in true_nodes if not h.startswith("L0"))
    prev = sorted(h for h in true_nodes if h.startswith("L0"))
    outside = [h for h in model_heads(model) if h not in true_nodes]
    gap = max(first - rep, 1e-6)
    res: dict[str, object] = {"first_half_loss": first, "repeat_loss": rep}
    closed = {}
    for label, heads in (("induction", induction), ("prev_token", prev), ("outside", outside)):
        loss = repeat_loss(model, clean, heads)[1] if heads else rep
        res[f"repeat_loss_ablate_{label}"] = loss
        closed[label] = (loss - rep) / gap
        res[f"gap_closed_ablate_{label}"] = closed[label]
    each = {h: repeat_loss(model, clean, [h])[1] for h in model_heads(model)}
    res["repeat_loss_ablate_each"] = each
    res["holds"] = bool(closed["induction"] >= 0.5 and closed["outside"] < 0.2)
    # Where the attention thresholds and behaviour part ways, head by head: shown, not hidden.
    disagreements = []
    for head, loss in each.items():
        share = (loss - rep) / gap
        if head not in true_nodes and share >= BEHAVIOUR_OUTSIDE:
            disagreements.append(
                f"{head}: outside the truth, yet ablating it alone closes {share:.0%} of the gap"
            )
        if head in true_nodes and share < BEHAVIOUR_INSIDE:
            disagreements.append(
                f"{head}: in the truth, yet ablating it alone closes only {share:.0%} of the gap"
            )
    res["behaviour_disagreements"] = disagreements
    return res


def induction_task(
    seed: int = 0,
    n_prompts: int = 50,
    prompt_seed: int = 1234,
    model: HookedTransformer | None = None,
) -> CircuitTask:
    """The induction `CircuitTask` on the shipped model of `seed` (or on `model`).

    Clean prompts repeat a random `HALF_LENGTH`-token half; corrupted ones keep the first half
    and replace the second with fresh tokens (no repeat); negatives are the corrupted prompts;
    positions mark the repeated half; the metric is `induction_metric`. The truth comes from
    `induction_truth` on the clean prompts, and the notes carry its scores and
    `induction_ablation_check`'s numbers.
    """
    if model is None:
        model = load_induction_model(seed)
    clean, corrupted = induction_prompts(n_prompts, HALF_LENGTH, prompt_seed)
    nodes, edges, notes = induction_truth(model, clean)
    notes["ablation_check"] = induction_ablation_check(model, clean, nodes)
    notes["truth_rule"] = (
        "nodes = heads with induction score >= INDUCTION_THRESHOLD (layer >= 1) plus heads "
        "with previous-token score >= PREV_TOKEN_THRESHOLD in an earlier layer; edges = "
        "input->prev, prev->induction, input->induction, induction->logits"
    )
    return CircuitTask(
        name=f"induction_seed{seed}",
        model=model,
        clean=clean,
        corrupted=corrupted,
        metric=induction_metric,
        true_nodes=nodes,
        true_edges=edges,
        negatives=corrupted,
        positions=repeat_positions(n_prompts, HALF_LENGTH),
        notes=notes,
    )
