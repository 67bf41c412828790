"""Revive dead codes: codes that no input selected are moved onto recent inputs.

Without this, codes initialised far from the data never win a top-k and never get a gradient;
re-seeding them near real inputs (and clearing their Adam moments) puts them back to work.
"""

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor


@torch.no_grad()
def replace_dead_codes(
    codes: Float[Tensor, "groups num_codes d"],
    hits: Int[Tensor, "groups num_codes"],
    recent_inputs: Float[Tensor, "n groups d"],
    noise_scale: float = 0.01,
    generator: torch.Generator | None = None,
) -> Int[Tensor, " groups"]:
    """Re-seed, in place, every code with zero `hits` at a recent input of its group plus noise.

    Each dead code of a group gets a different input of that group (drawn at random, without
    replacement while there are at least as many inputs as dead codes), plus Gaussian noise of
    norm about `noise_scale` times that input's norm so revived codes are not exact copies.
    Returns how many codes were replaced in each group. Typical use, with the mask kept for the
    optimizer: `dead = hits == 0; replace_dead_codes(...); reset_optimizer_rows(opt, codes, dead)`.
    Random draws come from `generator` (on any device; the global RNG when None).
    """
    if noise_scale < 0:
        raise ValueError(f"noise_scale must be >= 0, got {noise_scale}")
    num_inputs, num_groups, dim = recent_inputs.shape
    dead = hits == 0
    num_dead = dead.sum(-1)
    if num_inputs == 0:
        if bool(dead.any()):
            raise ValueError("recent_inputs is empty: there is nothing to re-seed dead codes with")
        return num_dead
    device = generator.device if generator is not None else codes.device

    # A random order of the inputs per group; the r-th dead code of a group takes the r-th.
    order = torch.rand(num_groups, num_inputs, generator=generator, device=device).argsort(-1)
    rank = (dead.long().cumsum(-1) - 1).clamp_min(0) % num_inputs
    chosen = order.to(codes.device).gather(-1, rank)
    inputs = recent_inputs.detach().to(codes.device, codes.dtype).transpose(0, 1)
    new_codes = inputs.gather(1, chosen.unsqueeze(-1).expand(-1, -1, dim))

    noise = torch.randn(new_codes.shape, generator=generator, device=device, dtype=codes.dtype)
    input_norm = new_codes.norm(dim=-1, keepdim=True)
    new_codes = new_codes + noise.to(codes.device) * (noise_scale * input_norm / dim**0.5)

    codes.copy_(torch.where(dead.unsqueeze(-1), new_codes, codes))
    return num_dead


@torch.no_grad()
def reset_optimizer_rows(
    optimizer: torch.optim.Optimizer, param: Tensor, mask: Bool[Tensor, "..."]
) -> int:
    """Zero the per-element optimizer state (e.g. Adam's exp_avg, exp_avg_sq) where `mask` is True.

    `mask` covers the leading dimensions of `param` (e.g. `groups num_codes` for codes of shape
    `groups num_codes d`), so whole code vectors are reset; scalar state such as Adam's `step`
    is shared by the whole tensor and left alone. Returns how many state tensors were reset
    (0 before the optimizer's first step, when it holds no state yet).
    """
    if not any(p is param for group in optimizer.param_groups for p in group["params"]):
        raise ValueError(
            f"param of shape {tuple(param.shape)} is not among the optimizer's parameters"
        )
    if tuple(mask.shape) != tuple(param.shape[: mask.ndim]):
        raise ValueError(
            f"mask of shape {tuple(mask.shape)} must match the leading dimensions of param "
            f"of shape {tuple(param.shape)}"
        )
    row_mask = mask.to(param.device).reshape(*mask.shape, *([1] * (param.ndim - mask.ndim)))
    num_reset = 0
    for value in optimizer.state.get(param, {}).values():
        if isinstance(value, Tensor) and value.shape == param.shape:
            value.masked_fill_(row_mask, 0)
            num_reset += 1
    return num_reset
