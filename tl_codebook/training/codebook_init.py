"""Where a codebook starts: Gaussian codes from a seed, distinct real inputs, or k-means centres.

The one initialisation of the package: the trainer calls it on the activations it collects, and
anything else that builds a codebook from data (the comparisons, the TokFSM demo) calls it too,
so the same rows and seed give the same codes everywhere.
"""

from __future__ import annotations

import zlib

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from tl_codebook.codebook import Codebook
from tl_codebook.configs import check_choice
from tl_codebook.training.config import CODEBOOK_INITS
from tl_codebook.training.kmeans import kmeans_grouped


@torch.no_grad()
def initialise_codebook(
    codebook: Codebook,
    rows: Float[Tensor, "n ..."] | None,
    method: str,
    seed: int = 0,
    kmeans_iters: int = 25,
) -> None:
    """Set `codebook.codes` in place by `method` (one of `CODEBOOK_INITS`), reproducibly from `seed`.

    - "random": i.i.d. N(0, init_std^2) codes (the codebook's own rule), drawn from `seed`;
      `rows` is not used and may be None.
    - "activations": each code is a different real input row, drawn at random.
    - "kmeans": the k-means centres of the rows (k-means++ seeding, `kmeans_iters` Lloyd passes).

    `rows` are inputs of the codebook, `[n, d_in]` or `[n, n_groups, d_group]`, with any rows
    that must not become codes (BOS positions) already removed; the data-driven methods need at
    least `num_codes` of them. Computation runs on the rows' device.

    Raises:
        ValueError: for an unknown `method`; for "activations"/"kmeans", `rows` that are None,
            of another width, fewer than `num_codes`, or holding NaN or infinite values.
    """
    check_choice("codebook init method", method, CODEBOOK_INITS)
    cfg = codebook.cfg
    codes = codebook.codes
    if method == "random":
        generator = torch.Generator().manual_seed(seed)
        fresh = torch.randn(codes.shape, generator=generator, dtype=torch.float32) * cfg.init_std
        codes.copy_(fresh.to(codes.device, codes.dtype))
        return
    if rows is None:
        raise ValueError(f"{method} init needs input rows; got None.")
    n = rows.shape[0]
    if rows.shape[1:] not in (torch.Size([cfg.d_in]), torch.Size([cfg.n_groups, cfg.d_group])):
        raise ValueError(
            f"{method} init of a codebook with d_in={cfg.d_in} needs rows [n, {cfg.d_in}] or "
            f"[n, {cfg.n_groups}, {cfg.d_group}], got {tuple(rows.shape)}."
        )
    where = f" of {cfg.hook_name!r}" if cfg.hook_name else ""
    if n < cfg.num_codes:
        raise ValueError(
            f"{method} init{where} needs at least num_codes={cfg.num_codes} input rows, got {n}."
        )
    grouped = rows.detach().reshape(n, cfg.n_groups, cfg.d_group)
    if not bool(torch.isfinite(grouped).all()):
        raise ValueError(f"{method} init{where}: the input rows contain NaN or infinite values.")
    if method == "kmeans":
        centres = kmeans_grouped(grouped, cfg.num_codes, n_iters=kmeans_iters, seed=seed)
    else:
        generator = torch.Generator().manual_seed(seed)
        chosen = torch.randperm(n, generator=generator)[: cfg.num_codes]
        centres = grouped[chosen.to(grouped.device)].transpose(0, 1)
    codes.copy_(centres.to(codes.device, codes.dtype))


def site_seed(seed: int, name: str) -> int:
    """A seed of its own for the codebook at `name` of a run seeded `seed`: stable across runs,
    independent of which other sites exist (32 bits: torch's CPU generator keeps no more)."""
    return zlib.crc32(f"{seed}/{name}".encode())


def kept_positions(
    tokens: Int[Tensor, "batch pos"], exclude_token_ids: list[int]
) -> Bool[Tensor, "batch pos"]:
    """True where the token is not one of `exclude_token_ids` (positions that may be samples)."""
    if not exclude_token_ids:
        return torch.ones(tokens.shape, dtype=torch.bool, device=tokens.device)
    excluded = torch.tensor(exclude_token_ids, dtype=tokens.dtype, device=tokens.device)
    return ~torch.isin(tokens, excluded)
