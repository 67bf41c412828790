"""What a code writes, read from the weights alone: the codes whose vectors are most like it
(`similar_codes`) and the tokens its vector pushes up and down (`logit_effects`).

Logit effects are the direct path only, as SAE dashboards show them for a feature: the code's
vector carried into the residual stream (through its head's `W_O` at `attn.hook_z`; as it is
at a residual or MLP/attention-output site) and multiplied by `W_U`, with no final LayerNorm
and no unembedding bias. That ranks tokens like the code's direct contribution to the logits
under a fixed LayerNorm scale; it ignores everything the later layers do with the vector.
"""

from __future__ import annotations

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens import HookedTransformer

from tl_codebook.codebook import Codebook
from tl_codebook.hooks.model import codebooks_of, unknown_hook_error

RESIDUAL_SITES = (
    "hook_embed",
    "hook_pos_embed",
    "hook_resid_pre",
    "hook_resid_mid",
    "hook_resid_post",
    "hook_attn_out",
    "hook_mlp_out",
)
"""Sites whose activation is (a term of) the residual stream: a code's vector is read by W_U
as it is. `ln_final.hook_normalized` (what W_U reads) is accepted too."""
PER_HEAD_SITES = ("attn.hook_z", "attn.hook_result")
"""Per-head sites (one group per head): hook_z through the head's W_O, hook_result as it is."""


def check_code_id(what: str, code: int, group: int, n_groups: int, num_codes: int) -> None:
    """A TypeError for a non-integer, a ValueError naming the valid range for an id out of it
    (the check `CodeCache.check_code` makes, for a codebook without a cache)."""
    for name, value in (("group", group), ("code", code)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise TypeError(f"{name} must be an integer, got {value!r}.")
    if not 0 <= group < n_groups:
        raise ValueError(
            f"group {group} is out of range for {what}: valid groups are 0..{n_groups - 1}."
        )
    if not 0 <= code < num_codes:
        raise ValueError(
            f"code {code} is out of range for {what}: valid codes are 0..{num_codes - 1}."
        )


def similar_codes(
    codebook: Codebook, code: int, group: int = 0, top: int = 10
) -> list[tuple[int, float]]:
    """The `top` codes of the same group whose vectors point most nearly the same way as
    `code`'s (cosine similarity, highest first; ties: lower code first); itself excluded.

    Groups are separate subspaces (a head each at hook_z), so only codes of `group` compare.
    """
    cfg = codebook.cfg
    check_code_id(f"the codebook at {cfg.hook_name!r}", code, group, cfg.n_groups, cfg.num_codes)
    if isinstance(top, bool) or top < 1:
        raise ValueError(f"top must be an integer >= 1, got {top!r}.")
    with torch.no_grad():
        vectors = codebook.codes[group].float()
        unit = vectors / vectors.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        cosine = unit @ unit[code]
        cosine[code] = -torch.inf
        values, order = torch.sort(cosine, descending=True, stable=True)
        n = min(top, cfg.num_codes - 1)
    return list(zip(order[:n].tolist(), values[:n].tolist(), strict=True))


def _codebook(model: HookedTransformer, hook: str) -> Codebook:
    present = codebooks_of(model)
    if hook not in present:
        raise unknown_hook_error(hook, present, what="codebook")
    return present[hook]


def code_residual_direction(
    model: HookedTransformer, hook: str, code: int, group: int = 0
) -> Float[Tensor, " d_model"]:
    """The vector code `code` of group `group` writes into the residual stream.

    attn.hook_z (one group per head): the code's d_head vector times W_O[layer, head];
    attn.hook_result (one group per head): the code's d_model vector; residual and
    MLP/attention-output sites: the code's vector in its group's slice of d_model, zeros
    elsewhere (the whole vector for one group).
    """
    codebook = _codebook(model, hook)
    cfg = codebook.cfg
    check_code_id(f"the codebook at {hook!r}", code, group, cfg.n_groups, cfg.num_codes)
    model_cfg = model.cfg
    vector = codebook.codes[group, code].detach().float()
    parts = hook.split(".")
    if hook.endswith(PER_HEAD_SITES):
        if cfg.n_groups != model_cfg.n_heads:
            raise ValueError(
                f"The codebook at {hook!r} has n_groups={cfg.n_groups}, but a per-head site needs "
                f"one group per head ({model_cfg.n_heads})."
            )
        if hook.endswith("hook_result"):
            return vector
        layer = int(parts[1])
        return vector @ model.W_O[layer, group].detach().float()
    if parts[-1] in RESIDUAL_SITES or hook == "ln_final.hook_normalized":
        if cfg.d_in != model_cfg.d_model:
            raise ValueError(
                f"The codebook at {hook!r} has d_in={cfg.d_in}, not the model's d_model="
                f"{model_cfg.d_model}."
            )
        direction = torch.zeros(cfg.d_in, device=vector.device)
        direction[group * cfg.d_group : (group + 1) * cfg.d_group] = vector
        return direction
    raise ValueError(
        f"logit_effects cannot carry a code at {hook!r} to the unembedding; supported sites: "
        f"{', '.join(PER_HEAD_SITES + RESIDUAL_SITES)} and ln_final.hook_normalized."
    )


def logit_effects(
    model: HookedTransformer, hook: str, code: int, group: int = 0, top: int = 10
) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """The tokens whose logits the code's vector raises most and lowers most, by its direct
    path `direction @ W_U` (no final LayerNorm, no b_U; see the module docstring):
    `(top, bottom)`, each `[(token_id, value)]`, top highest first and bottom lowest first."""
    if isinstance(top, bool) or top < 1:
        raise ValueError(f"top must be an integer >= 1, got {top!r}.")
    with torch.no_grad():
        direction = code_residual_direction(model, hook, code, group)
        logits = direction @ model.W_U.detach().float()
        n = min(top, logits.shape[0])
        high = torch.topk(logits, n)
        low = torch.topk(-logits, n)
    return (
        list(zip(high.indices.tolist(), high.values.tolist(), strict=True)),
        list(zip(low.indices.tolist(), (-low.values).tolist(), strict=True)),
    )
