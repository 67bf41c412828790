"""Topic steering of a language model through its codes: find each topic's codes in the code
cache, force them on while the model writes from neutral prompts, and measure what it wrote.

A topic's codes are found as the reference finds topic codes: codes that fire on a large share of
the topic's tokens. Among the codes firing on at least `min_recall` of a topic's cached tokens,
the most precise one of each (site, head) slot is kept, and the `slots` most precise slots are
forced together (`force_codes`, every position): each forced code takes one of its head's k
slots, so the heads are nudged while the residual stream flows on.

Generation uses TransformerLens' own `generate` (KV cache, top-k sampling) under `force_codes`,
seeded per call, so a rerun writes the same texts. The base model's loss on each continuation
(codebooks bypassed) is what the fluency check compares with the unsteered generations.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from tl_codebook.analysis.search import CodeMatch
from tl_codebook.hooks.interventions import SteeringSpec, force_codes
from tl_codebook.hooks.model import HookedCodebookTransformer, codebooks_disabled


@dataclass(frozen=True)
class TopicCodes:
    """The codes chosen to steer towards one topic, best first, and the spec that forces them."""

    topic: str
    matches: list[CodeMatch]

    @property
    def spec(self) -> SteeringSpec:
        out: SteeringSpec = {}
        for m in self.matches:
            out.setdefault(m.hook, {}).setdefault(m.group, []).append(m.code)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"topic": self.topic, "codes": [m.to_dict() for m in self.matches]}


def choose_topic_codes(
    cache: Any,
    topic: str,
    mask: np.ndarray,
    slots: int,
    min_recall: float,
    codes_per_slot: int = 1,
    min_precision: float = 0.0,
) -> TopicCodes:
    """Each topic's steering codes: in each (site, head) slot the `codes_per_slot` best codes by
    F1 among those with precision >= `min_precision` and recall >= `min_recall` on the topic's
    tokens (`mask`), in the `slots` slots whose best code has the highest F1.

    F1 over a topic's tokens favours codes that fire across its articles (the reference's topic
    codes fire on a large share of one document) over rare topic-word codes.

    Raises:
        ValueError: when no code passes both floors (lower them, or train longer).
    """
    found = cache.search(mask=mask, min_recall=min_recall, min_precision=min_precision, top=None)
    per_slot: dict[tuple[str, int], list[CodeMatch]] = {}
    for m in sorted(found, key=lambda m: (-m.f1, -m.precision, m.hook, m.group, m.code)):
        chosen_here = per_slot.setdefault((m.hook, m.group), [])
        if len(chosen_here) < codes_per_slot:
            chosen_here.append(m)
    best = sorted(per_slot.values(), key=lambda ms: (-ms[0].f1, -ms[0].precision))[:slots]
    if not best:
        raise ValueError(
            f"No code fires on at least {min_recall:.0%} of topic {topic!r}'s cached tokens with "
            f"precision >= {min_precision}; lower min_topic_recall / min_topic_precision or "
            "cache more text."
        )
    return TopicCodes(topic, [m for ms in best for m in ms])


def check_prompt_fits(n_prompt_tokens: int, new_tokens: int, n_ctx: int, prompt: str) -> None:
    """Refuse a prompt that leaves no room for `new_tokens` in the model's context.

    Raises:
        ValueError: naming the prompt, its length, the new tokens and the context.
    """
    if n_prompt_tokens + new_tokens > n_ctx:
        raise ValueError(
            f"prompt {prompt[:60]!r} is {n_prompt_tokens} tokens; with {new_tokens} new tokens "
            f"that exceeds the model's context of {n_ctx} tokens. Shorten it or lower new_tokens."
        )


def generate_continuations(
    model: HookedCodebookTransformer,
    prompts: Sequence[Tensor],
    new_tokens: int,
    temperature: float,
    top_k: int,
    seed: int,
    intervention: Callable[[], AbstractContextManager[Any]] | None = None,
) -> Int[Tensor, "n new_tokens"]:
    """`new_tokens` sampled tokens after each prompt (token ids, BOS first; any lengths), made
    in one batch inside `intervention()` (e.g. `forcing(model, spec)`; None: no intervention).

    The prompts are left-padded to one length and TransformerLens' `generate` masks the padding
    (KV cache, top-k sampling); generating one sample of 40 tokens costs about as much as ten,
    so every trial of a condition runs together. Seeded: the same call writes the same tokens.

    Raises:
        ValueError: for a prompt that leaves no room for `new_tokens` in the context, or no
            prompts.
    """
    if not prompts:
        raise ValueError("generate_continuations needs at least one prompt.")
    for prompt in prompts:
        check_prompt_fits(
            int(prompt.shape[0]), new_tokens, model.cfg.n_ctx, f"token ids {prompt.tolist()}"
        )
    tokenizer = model.tokenizer
    if tokenizer is None:
        raise ValueError("generate_continuations needs a model with a tokenizer (to pad prompts).")
    texts = [tokenizer.decode(p.tolist(), skip_special_tokens=False) for p in prompts]
    torch.manual_seed(seed)
    with torch.no_grad(), intervention() if intervention is not None else nullcontext():
        out = model.generate(
            texts if len(texts) > 1 else texts[0],
            max_new_tokens=new_tokens,
            stop_at_eos=False,
            do_sample=temperature > 0,
            top_k=top_k,
            temperature=max(temperature, 1e-6),
            use_past_kv_cache=True,
            prepend_bos=False,
            padding_side="left",
            return_type="tokens",
            verbose=False,
        )
    assert isinstance(out, Tensor)
    return out[:, -new_tokens:].cpu()


def forcing(
    model: HookedCodebookTransformer, spec: SteeringSpec
) -> Callable[[], AbstractContextManager[Any]]:
    """The intervention that forces `spec`'s codes on at every position (`force_codes`)."""
    return lambda: force_codes(model, spec)


@torch.no_grad()
def continuation_losses(
    model: HookedCodebookTransformer,
    prompts: Sequence[Tensor],
    continuations: Int[Tensor, "n new_tokens"],
) -> Float[Tensor, " n"]:
    """The base model's (codebooks bypassed) mean next-token loss on each continuation after its
    prompt: how natural the text reads to the unedited model. One forward over the rows
    right-padded to one length (a causal model never sees the padding after a row's end)."""
    n, new = continuations.shape
    rows = [torch.cat([p.cpu(), c]) for p, c in zip(prompts, continuations, strict=True)]
    width = max(int(r.shape[0]) for r in rows)
    batch = torch.zeros(n, width, dtype=torch.long)
    for i, row in enumerate(rows):
        batch[i, : row.shape[0]] = row
    with codebooks_disabled(model):
        log_probs = model(batch.to(model.cfg.device)).float().log_softmax(-1).cpu()
    losses = torch.empty(n)
    for i, prompt in enumerate(prompts):
        start = int(prompt.shape[0])
        predicted = log_probs[i, start - 1 : start - 1 + new]
        losses[i] = -predicted.gather(-1, continuations[i].unsqueeze(-1)).mean()
    return losses


def decode_continuations(tokenizer: Any, continuations: Tensor) -> list[str]:
    """Each continuation as text."""
    return [tokenizer.decode(row.tolist()) for row in continuations]


def prompt_tokens(tokenizer: Any, prompts: Sequence[str]) -> list[Tensor]:
    """Each prompt as token ids with the tokenizer's BOS first (as the cached rows start)."""
    bos = tokenizer.bos_token_id
    out = []
    for prompt in prompts:
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        out.append(torch.tensor(([bos] if bos is not None else []) + ids, dtype=torch.long))
    return out


__all__ = [
    "SteeringSpec",
    "TopicCodes",
    "check_prompt_fits",
    "choose_topic_codes",
    "continuation_losses",
    "decode_continuations",
    "forcing",
    "generate_continuations",
    "prompt_tokens",
]
