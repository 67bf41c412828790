"""A hand-built attention-only transformer where exactly one head carries the metric.

The known-answer fixture of the circuit-discovery methods: every method must rank the carrying
head first. The weights are set by hand (no training), on explicit one-hot residual subspaces::

    dims  0..15   token one-hot (16 tokens)
    dims 16..25   position one-hot (10 positions)
    dims 26..41   carrier output: the previous token, one-hot      <- the only dims W_U reads
    dims 42..49   L0H0 output        dims 50..57   L0H1 output        dims 58..65   L1H1 output

* **L1H0, the carrier** (`CARRIER`): its query reads the position one-hot, its key the position
  one-hot shifted by one, so position p scores key p - 1 at 4 and every other key at 0 (about
  0.86-0.98 of the attention on the previous token: moderate, not saturated, so attribution
  gradients are nonzero); its value copies the token identity into dims 26..41, which the
  unembedding maps to that token's logit (gain 5). Task: predict the previous token.
* **Distractors**, each active (a nonzero output that varies with the input) but writing only
  into dims nothing downstream of the metric reads. They read tokens only through their class
  `token % 8`: L0H0 attends uniformly (a histogram of the classes so far), L0H1 attends to
  position 0 (the first token's class, permuted), L1H1 queries with L0H1's output, keys on the
  token classes and reads L0H0's output (real distractor edges L0H0, L0H1 -> L1H1).

**Prompts.** 10 tokens. Clean prompts draw every token from the lower half `0..7`; the corrupted
prompt of each is the same prompt shifted to the upper half (`token + 8`). The carrier copies a
different token there (the metric drops from about +4 to about -0.3), while every distractor,
reading only `token % 8`, gives exactly the same output on clean and corrupted prompts. The
negatives are the corrupted prompts (the default), so a code-histogram method sees the carrier's
outputs move from the lower-half directions to the upper-half ones and the distractors' stay.

**Metric.** The logit of the clean answer (the previous token) minus the mean logit, averaged over
positions 1..9 (`positions`): about +4.3 on clean prompts, exactly `-5/16` on corrupted ones,
exactly 0 with the carrier zero-ablated, unchanged (to float precision: the subspaces are
disjoint) with any distractor ablated.
"""

from __future__ import annotations

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens import HookedTransformer, HookedTransformerConfig

from tl_codebook.comparisons.circuits.task import INPUT, LOGITS, CircuitTask, edge_name

__all__ = ["CARRIER", "one_head_model", "one_head_task"]

CARRIER = "L1H0"
"""The one head that carries the metric."""

D_VOCAB = 16
"""Tokens: clean prompts use 0..7, corrupted ones 8..15."""
SEQ_LEN = 10
"""Prompt length (the model's n_ctx)."""
N_CLASSES = 8
"""Distractors read tokens only through `token % N_CLASSES`."""
SCORE = 4.0
"""Attention score of the carrier's previous-token key (others score 0)."""
LOGIT_GAIN = 5.0
"""Logit of the copied token per unit of carrier output."""

_TOK, _POS = 0, D_VOCAB
_CARRIER_OUT = _POS + SEQ_LEN
_D_OUT = {
    (0, 0): _CARRIER_OUT + D_VOCAB,
    (0, 1): _CARRIER_OUT + D_VOCAB + N_CLASSES,
    (1, 1): _CARRIER_OUT + D_VOCAB + 2 * N_CLASSES,
}
D_MODEL = _CARRIER_OUT + D_VOCAB + 3 * N_CLASSES
"""Residual width: token, position, carrier and three distractor subspaces."""
D_HEAD = 16
"""Head width (the carrier copies all 16 tokens)."""


def one_head_model() -> HookedTransformer:
    """The hand-built 2-layer, 2-head attention-only model (see the module docstring): L1H0
    copies the previous token into the only subspace the unembedding reads; L0H0, L0H1 and L1H1
    are active distractors that read token classes and write where nothing reads.

    Why: a model whose circuit is one head by construction, for the methods' known-answer tests.
    """
    cfg = HookedTransformerConfig(
        n_layers=2,
        n_heads=2,
        d_model=D_MODEL,
        d_head=D_HEAD,
        n_ctx=SEQ_LEN,
        d_vocab=D_VOCAB,
        d_vocab_out=D_VOCAB,
        attn_only=True,
        normalization_type=None,
        act_fn="relu",
        positional_embedding_type="standard",
        default_prepend_bos=False,
        device="cpu",
        seed=0,
    )
    model = HookedTransformer(cfg)
    state = {k: torch.zeros_like(v) for k, v in model.state_dict().items()}
    # keep TL's buffers (causal mask, IGNORE) as they are
    for key, value in model.state_dict().items():
        if not key.split(".")[-1].startswith(("W_", "b_")):
            state[key] = value
    scale = D_HEAD**0.5  # TL divides q.k by sqrt(d_head)
    tokens = torch.arange(D_VOCAB)
    positions = torch.arange(SEQ_LEN)
    classes = tokens % N_CLASSES

    state["embed.W_E"][tokens, _TOK + tokens] = 1.0
    state["pos_embed.W_pos"][positions, _POS + positions] = 1.0

    # carrier, L1H0: position p attends to p - 1, copies the token identity
    w = "blocks.1.attn."
    state[w + "W_Q"][0, _POS + positions, positions] = 1.0
    state[w + "W_K"][0, _POS + positions[:-1], positions[:-1] + 1] = SCORE * scale
    state[w + "W_V"][0, _TOK + tokens, tokens] = 1.0
    state[w + "W_O"][0, tokens, _CARRIER_OUT + tokens] = 1.0
    state["unembed.W_U"][_CARRIER_OUT + tokens, tokens] = LOGIT_GAIN

    # L0H0: uniform attention, value = token class
    out = _D_OUT[(0, 0)]
    state["blocks.0.attn.W_V"][0, _TOK + tokens, classes] = 1.0
    state["blocks.0.attn.W_O"][0, torch.arange(N_CLASSES), out + torch.arange(N_CLASSES)] = 1.0
    # L0H1: attends to position 0 (score 3), value = permuted token class
    out = _D_OUT[(0, 1)]
    state["blocks.0.attn.W_Q"][1, _POS + positions, 0] = 1.0
    state["blocks.0.attn.W_K"][1, _POS, 0] = 3.0 * scale
    state["blocks.0.attn.W_V"][1, _TOK + tokens, (3 * classes + 1) % N_CLASSES] = 1.0
    state["blocks.0.attn.W_O"][1, torch.arange(N_CLASSES), out + torch.arange(N_CLASSES)] = 1.0
    # L1H1: query = L0H1's output, key = the (same-permuted) token class, value = L0H0's output
    out, q_in, v_in = _D_OUT[(1, 1)], _D_OUT[(0, 1)], _D_OUT[(0, 0)]
    c = torch.arange(N_CLASSES)
    state[w + "W_Q"][1, q_in + c, c] = 1.0
    state[w + "W_K"][1, _TOK + tokens, (3 * classes + 1) % N_CLASSES] = 3.0 * scale
    state[w + "W_V"][1, v_in + c, c] = 1.0
    state[w + "W_O"][1, c, out + c] = 1.0

    model.load_state_dict(state)
    model.eval()
    return model


def one_head_task(n_prompts: int = 20, seed: int = 0) -> CircuitTask:
    """The "one_head" task: `one_head_model()`, `n_prompts` clean prompts over tokens 0..7,
    their corrupted copies shifted to 8..15, a previous-token logit metric at positions 1..9, and
    the truth {L1H0} with edges {input->L1H0, L1H0->logits}.

    Why: the smallest known answer a circuit-discovery method must get right (rank L1H0 first,
    give the distractors nothing). The same seed gives the same prompts.

    Raises:
        ValueError: for `n_prompts` < 1.
    """
    if n_prompts < 1:
        raise ValueError(f"n_prompts must be >= 1, got {n_prompts}.")
    gen = torch.Generator().manual_seed(seed)
    clean = torch.randint(0, D_VOCAB // 2, (n_prompts, SEQ_LEN), generator=gen)
    corrupted = clean + D_VOCAB // 2
    positions = torch.ones(n_prompts, SEQ_LEN, dtype=torch.bool)
    positions[:, 0] = False

    def metric(
        logits: Float[Tensor, "n pos d_vocab"], clean_tokens: Int[Tensor, "n pos"]
    ) -> Float[Tensor, " n"]:
        at = logits[:, 1:]
        answer = clean_tokens[:, :-1].unsqueeze(-1)
        return (at.gather(-1, answer).squeeze(-1) - at.mean(dim=-1)).mean(dim=-1)

    return CircuitTask(
        name="one_head",
        model=one_head_model(),
        clean=clean,
        corrupted=corrupted,
        metric=metric,
        true_nodes=frozenset({CARRIER}),
        true_edges=frozenset({edge_name(INPUT, CARRIER), edge_name(CARRIER, LOGITS)}),
        negatives=None,
        positions=positions,
        notes={
            "source": "hand-built weights (no training), disjoint one-hot residual subspaces",
            "circuit": f"{CARRIER} copies the previous token into the only subspace W_U reads",
            "distractors": "L0H0 (uniform), L0H1 (first token), L1H1 (reads both): token classes "
            "token % 8, written where neither W_U nor the carrier reads",
            "negatives": "the corrupted prompts: every token shifted by 8, so distractor outputs "
            "are identical and the carrier's move to the upper-half directions",
        },
    )
