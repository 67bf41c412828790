"""The SAE baseline of topic steering: a SAELens TopK SAE trained on the base model's activations
at one codebook site, with the codebooks' budget, whose best features per topic are clamped on
while the model writes.

- Site: the codebook site holding most of the topics' steering codes (the layer where the
  codebooks found topics), so both methods steer where topic information is.
- Budget: the same tokens as the codebook training (`steps * batch_size * seq_len`, the same
  training split), the codebooks' width (`d_sae = n_heads * num_codes`) and sparsity
  (`k = n_heads * k`), through the comparison's one SAE trainer (`comparisons.methods`).
- Features: for each topic, the same rule as the codes (`steering.choose_topic_codes`): among
  features active on at least `min_recall` of the topic's cached tokens, the most precise, with
  precision and recall from `analysis.concepts` (the one counter).
- Steering: at every position the chosen features are clamped to their mean active value on the
  topic's tokens, and only the change is added to the activation (x + decode(clamped) -
  decode(acts)): the SAE's reconstruction error stays in, as in SAE steering practice, so an
  undertrained SAE is not blamed for its reconstruction.
"""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor

from tl_codebook.analysis.concepts import ConceptScores
from tl_codebook.hooks.model import codebooks_disabled


def sae_site(topic_codes: dict[str, Any], fallback: str) -> str:
    """The site holding most steering codes over all topics (ties: the first in order)."""
    counts = Counter(m["hook"] for found in topic_codes.values() for m in found["steering_codes"])
    return counts.most_common(1)[0][0] if counts else fallback


def train_topk_sae(
    model: Any,
    hook: str,
    train_rows: Int[Tensor, "n pos"],
    d_sae: int,
    k: int,
    lr: float,
    batch_size: int,
    out_dir: Path,
    seed: int,
    progress: bool,
) -> Any:
    """A SAELens TopK SAE on the base model's activations at `hook` over `train_rows`, saved
    (SAELens format) in `out_dir/sae`; returns the `TrainedMethod`."""
    from tl_codebook.comparisons.methods import MethodSpec, TrainingConfig, train_method
    from tl_codebook.comparisons.store.reader import ActivationStore

    bos = model.tokenizer.bos_token_id if model.tokenizer is not None else None
    store_dir = out_dir / "sae_store"
    with codebooks_disabled(model):
        store = ActivationStore.build(
            model, train_rows, [hook], store_dir, overwrite=True, progress=progress
        )
    excluded = [bos] if bos is not None else []
    config = TrainingConfig(
        hook_name=hook,
        d_sae=d_sae,
        k=k,
        training_tokens=store.count_tokens(excluded),
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        exclude_token_ids=excluded,
        device=str(model.cfg.device),
        progress=progress,
    )
    method = train_method(MethodSpec(kind="topk"), store, config, save_dir=out_dir / "sae")
    shutil.rmtree(store_dir)  # the activations (hundreds of MB) are spent
    return method


@torch.no_grad()
def feature_topic_scores(
    model: Any,
    method: Any,
    hook: str,
    rows: Int[Tensor, "n pos"],
    topic_ids: Int[Tensor, " n"],
    n_topics: int,
) -> tuple[ConceptScores, Tensor]:
    """Each feature's precision/recall for each topic over `rows` (BOS left out; every token of
    row i has topic `topic_ids[i]`), and its mean active value per topic `[d_sae, n_topics]`."""
    joint = torch.zeros(1, method.d_sae, n_topics, dtype=torch.long)
    sums = torch.zeros(method.d_sae, n_topics)
    labels = torch.zeros(n_topics, dtype=torch.long)
    for start in range(0, rows.shape[0], 8):
        part = rows[start : start + 8].to(model.cfg.device)
        with codebooks_disabled(model):
            _, cache = model.run_with_cache(part, names_filter=hook)
        act = cache[hook][:, 1:].flatten(2).float()  # [b, pos - 1, d_in]
        acts = method.encode(act).cpu()  # [b, pos - 1, d_sae]
        for i, topic in enumerate(topic_ids[start : start + 8].tolist()):
            active = acts[i] > 0
            joint[0, :, topic] += active.sum(0)
            sums[:, topic] += acts[i].sum(0)
            labels[topic] += acts.shape[1]
    counts = joint.sum(-1)
    scores = ConceptScores.from_counts(joint, counts, labels)
    mean_active = sums / joint[0].clamp(min=1).float()
    return scores, mean_active


def choose_features(
    scores: ConceptScores, mean_active: Tensor, topic: int, n: int, min_recall: float
) -> list[dict[str, Any]]:
    """The `n` most precise features with recall >= `min_recall` for `topic` (may be empty)."""
    precision, recall = scores.precision[0, :, topic], scores.recall[0, :, topic]
    eligible = torch.nonzero(recall >= min_recall).flatten()
    if eligible.numel() == 0:
        return []
    key = precision[eligible] * 2 + recall[eligible]  # precision first, recall breaks ties
    order = eligible[torch.argsort(key, descending=True, stable=True)][:n]
    return [
        {
            "feature": int(f),
            "precision": float(precision[f]),
            "recall": float(recall[f]),
            "value": float(mean_active[f, topic]),
        }
        for f in order
    ]


def clamp_hook(method: Any, features: list[dict[str, Any]]) -> Any:
    """A hook adding the change that clamping `features` to their values makes (x's own
    reconstruction error kept)."""
    ids = [f["feature"] for f in features]
    values = torch.tensor([f["value"] for f in features])

    def hook(act: Tensor, hook: Any) -> Tensor:
        x = act.flatten(-2) if act.ndim == 4 else act  # hook_z: [b, pos, heads, d_head]
        acts = method.encode(x.float())
        clamped = acts.clone()
        clamped[..., ids] = values.to(acts.device, acts.dtype)
        delta = method.decode(clamped) - method.decode(acts)
        return (x + delta.to(x.dtype)).reshape(act.shape)

    return hook


__all__ = ["choose_features", "clamp_hook", "feature_topic_scores", "sae_site", "train_topk_sae"]
