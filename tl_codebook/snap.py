"""The snap: score every code, keep the top k, output their mean, pass gradients straight through.

Kept apart from the `Codebook` module so that the numerics (chunked scoring, the gather and the
custom backward) can be tested, benchmarked and reused without any hook machinery around them.

Memory: scores are computed under `no_grad` in chunks of rows, so the largest temporary is
`chunk_size x num_codes` floats, and nothing of size tokens x codes is kept for backward. The
gather-mean is `F.embedding_bag(mode="mean")`, which never materialises `[tokens, k, d]`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor

from tl_codebook.configs import check_choice

SIMILARITIES = ("inner_product", "cosine", "euclidean")


def check_similarity(similarity: str) -> str:
    """Return `similarity` if it is known, else raise a ValueError naming the valid choices."""
    return check_choice("similarity", similarity, SIMILARITIES)


def norm_floor(dtype: torch.dtype) -> float:
    """The smallest norm we divide by: 1e-12, or the dtype's smallest normal number where 1e-12
    is not representable (fp16: 1e-12 rounds to 0, and 0/0 = NaN would win every top-k).

    A zero vector divided by it stays zero, so a zero-norm code scores 0 in every dtype.
    """
    return max(1e-12, torch.finfo(dtype).tiny)


def _norms(t: Tensor) -> Tensor:
    """Norms over the last axis computed in fp32 (or wider): a half-precision sum of squares
    overflows at |t| ~ 256 (fp16). Returned in t's dtype, floored at `norm_floor`."""
    wide = torch.promote_types(t.dtype, torch.float32)
    norms = torch.linalg.vector_norm(t, dim=-1, keepdim=True, dtype=wide)
    return norms.clamp_min(norm_floor(t.dtype)).to(t.dtype)


def l2norm(t: Tensor) -> Tensor:
    return t / _norms(t)


def code_scores(
    x: Float[Tensor, "rows groups d"],
    codes: Float[Tensor, "groups num_codes d"],
    similarity: str,
) -> Float[Tensor, "rows groups num_codes"]:
    """The true similarity of every row to every code (materialises rows x codes: small inputs).

    inner_product: x . c/|c|; cosine: x/|x| . c/|c|; euclidean: -|x - c|.
    """
    check_similarity(similarity)
    if similarity == "euclidean":  # cdist has no half-precision kernel on CPU: widen, then back
        wide = torch.promote_types(x.dtype, torch.float32)
        dist = torch.cdist(x.transpose(0, 1).to(wide), codes.to(wide)).transpose(0, 1)
        return -dist.to(x.dtype)
    keys = l2norm(codes.to(x.dtype))
    scores = torch.einsum("ngd,gcd->ngc", x, keys)
    if similarity == "cosine":
        scores = scores / _norms(x)
    return scores


def _ranking_keys(
    codes: Tensor, similarity: str, dtype: torch.dtype
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Keys, per-code bias and per-code scale whose `(x . key + bias) * scale` ranks codes
    exactly like the similarity.

    Cosine ranks like inner product (dividing by |x| is the same for every code of a row), and
    -|x - c| ranks like x.c - |c|^2/2 (|x|^2 is the same for every code of a row), which turns
    every similarity into one batched matmul against the codes themselves. Inner product
    scales each chunk of scores by 1/|c| in place rather than copying the codes normalised
    (a codes-sized temporary).
    """
    codes = codes.detach().to(dtype)
    if similarity == "euclidean":
        return codes, -0.5 * (codes * codes).sum(-1), None
    return codes, None, _norms(codes).squeeze(-1).reciprocal()


def select_codes(
    x: Float[Tensor, "rows groups d"],
    codes: Float[Tensor, "groups num_codes d"],
    k: int,
    similarity: str,
    chunk_size: int,
    disabled: Bool[Tensor, "groups num_codes"] | None = None,
) -> Int[Tensor, "rows groups k"]:
    """Top-k code ids per row and group, best first, scoring `chunk_size` rows (all groups) at a time.

    One score buffer of `chunk_size x groups x num_codes` floats is reused across chunks, so the
    peak is one chunk (chunk_size / rows of the full score matrix), not two.
    `disabled` codes get score -inf, so the next best codes are chosen instead (ablation).
    With k = 1 the selection is an argmax (the paper's TokFSM setting; the trainer benchmark
    found topk(1) to be most of the gap to the unavoidable cost).
    """
    check_similarity(similarity)
    rows, groups, _ = x.shape
    num_codes = codes.shape[1]
    keys, bias, scale = _ranking_keys(codes, similarity, x.dtype)
    keys_t = keys.transpose(1, 2)  # [groups, d, num_codes]
    if disabled is not None and bool(disabled.any()):
        extra = torch.zeros(disabled.shape, dtype=x.dtype, device=x.device)
        extra = extra.masked_fill(disabled, float("-inf"))
        bias = extra if bias is None else bias + extra
    ids = torch.empty(rows, groups, k, dtype=torch.long, device=x.device)
    step = min(chunk_size, max(rows, 1))
    buffer = torch.empty(groups * step * num_codes, dtype=x.dtype, device=x.device)
    with torch.no_grad():
        for start in range(0, rows, step):
            chunk = x[start : start + step].detach().transpose(0, 1)  # [groups, n, d]
            scores = buffer[: chunk.numel() // chunk.shape[-1] * num_codes]
            scores = scores.view(groups, chunk.shape[1], num_codes)
            torch.bmm(chunk, keys_t, out=scores)
            if scale is not None:
                scores.mul_(scale.unsqueeze(1))
            if bias is not None:
                scores.add_(bias.unsqueeze(1))
            if k == 1:  # argmax is ~3x faster than topk(1) on CPU; first index on ties
                best = scores.argmax(dim=-1, keepdim=True)
            else:
                best = scores.topk(k, dim=-1).indices
            ids[start : start + step] = best.transpose(0, 1)
    return ids


def _gather_mean_flat(ids: Tensor, codes: Tensor) -> Tensor:
    """`gather_mean` as `[rows * groups, d]`: a tensor of its own, not a view."""
    rows, groups, k = ids.shape
    num_codes = codes.shape[1]
    offsets = torch.arange(groups, device=ids.device).mul_(num_codes).view(1, groups, 1)
    flat_ids = (ids + offsets).reshape(rows * groups, k)
    table = codes.reshape(groups * num_codes, codes.shape[-1])
    return F.embedding_bag(flat_ids, table, mode="mean")


def gather_mean(
    ids: Int[Tensor, "rows groups k"], codes: Float[Tensor, "groups num_codes d"]
) -> Float[Tensor, "rows groups d"]:
    """Per row and group, the mean of the chosen code vectors (differentiable in `codes`)."""
    return _gather_mean_flat(ids, codes).view(*ids.shape[:2], codes.shape[-1])


class _SnapGradients(torch.autograd.Function):
    """Identity on the quantized value; shapes the gradients of the snap (see `straight_through`).

    Backward: the input gets the downstream gradient unchanged (straight-through) plus the
    commitment term 2*beta*(x - q)/n; the quantized value (hence the gathered codes) gets the
    downstream gradient plus the reconstruction term 2*alpha*(q - x)/n, n = number of tokens.
    These are the gradients of alpha*mean_tokens|q - sg(x)|^2 + beta*mean_tokens|x - sg(q)|^2.
    """

    @staticmethod
    def forward(ctx, x, quantized, commitment: float, reconstruction: float, n_tokens: int):  # type: ignore[override]
        ctx.commitment = commitment
        ctx.reconstruction = reconstruction
        ctx.n_tokens = n_tokens
        if commitment or reconstruction:
            ctx.save_for_backward(x, quantized)
        # a fresh tensor, not a view of an input: callers may edit the result in place
        return quantized.clone()

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        grad_x = grad_q = grad
        if ctx.commitment or ctx.reconstruction:
            x, quantized = ctx.saved_tensors
            # grad +- c * (q - x) with one new tensor each, no (q - x) temporary.
            if ctx.reconstruction:
                r = 2.0 * ctx.reconstruction / ctx.n_tokens
                grad_q = torch.add(grad, quantized, alpha=r).sub_(x, alpha=r)
            if ctx.commitment:
                c = 2.0 * ctx.commitment / ctx.n_tokens
                grad_x = torch.add(grad, x, alpha=c).sub_(quantized, alpha=c)
        return grad_x, grad_q, None, None, None


def straight_through(
    x: Float[Tensor, "rows groups d"],
    quantized: Float[Tensor, "rows groups d"],
    commitment: float = 0.0,
    reconstruction: float = 0.0,
    n_tokens: int | None = None,
) -> Float[Tensor, "rows groups d"]:
    """A copy of `quantized` with the straight-through / commitment / reconstruction gradients.

    For a `quantized` computed elsewhere (SAELens' decode); the codebook itself uses
    `snap_output`, which gathers inside the autograd function and so needs no copy.
    """
    n = x.shape[0] if n_tokens is None else n_tokens
    return _SnapGradients.apply(x, quantized, float(commitment), float(reconstruction), max(n, 1))


class _GatherStraightThrough(torch.autograd.Function):
    """The snap's output from the chosen ids: gather-mean forward, shaped gradients backward.

    Forward returns a tensor the function made itself (not a view of an input), so hooks after
    the codebook may edit it in place, the TransformerLens idiom `act[:, 1] = 0`, with gradients
    on. Nothing of the output is saved for backward (an in-place edit would invalidate it):
    backward re-gathers the codes where the reconstruction or commitment term needs them.

    Gradients: x gets the downstream gradient (straight-through) plus 2*beta*(x - q)/n; each
    chosen code gets, through the mean, (downstream + 2*alpha*(q - x)/n) / k, the gradients of
    alpha*mean_tokens|q - sg(x)|^2 + beta*mean_tokens|x - sg(q)|^2 (n = number of tokens).
    """

    @staticmethod
    def forward(ctx, x, codes, ids, commitment: float, reconstruction: float, n_tokens: int):  # type: ignore[override]
        ctx.commitment = commitment
        ctx.reconstruction = reconstruction
        ctx.n_tokens = n_tokens
        ctx.save_for_backward(x if commitment or reconstruction else None, codes, ids)
        # [rows * groups, d], not a view: a view returned from here could not be edited in place
        out = _gather_mean_flat(ids, codes)
        # NaN in, NaN out: a row's max and min are finite exactly when the row is (they never
        # overflow, and propagate NaN), and 0 * (inf or NaN) is NaN, so a non-finite row
        # becomes all NaN instead of a code; no host sync, no full-size temporary
        x = x.detach()
        poison = x.amax(-1).mul_(0.0).add_(x.amin(-1).mul_(0.0))
        return out.add_(poison.reshape(-1, 1))

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        x, codes, ids = ctx.saved_tensors
        grad = grad.reshape(*ids.shape[:2], codes.shape[-1])
        grad_x = grad_q = grad
        if ctx.commitment or ctx.reconstruction:
            q = gather_mean(ids, codes)
            if ctx.commitment:
                c = 2.0 * ctx.commitment / ctx.n_tokens
                grad_x = torch.add(grad, x, alpha=c).sub_(q, alpha=c)
            if ctx.reconstruction:
                r = 2.0 * ctx.reconstruction / ctx.n_tokens
                grad_q = q.mul_(r).add_(grad).sub_(x, alpha=r)  # q's buffer, no new tensor
        grad_codes = None
        if ctx.needs_input_grad[1]:
            rows, groups, k = ids.shape
            num_codes = codes.shape[1]
            offsets = torch.arange(groups, device=ids.device).mul_(num_codes).view(1, groups)
            table = torch.zeros(
                groups * num_codes, codes.shape[-1], dtype=grad.dtype, device=grad.device
            )
            flat_grad = grad_q.reshape(rows * groups, -1)
            for slot in range(k):  # one scatter-add per slot: no [rows, k, d] temporary
                table.index_add_(0, (ids[..., slot] + offsets).reshape(-1), flat_grad)
            grad_codes = table.div_(k).view_as(codes)
        return grad_x if ctx.needs_input_grad[0] else None, grad_codes, None, None, None, None


def snap_output(
    x: Float[Tensor, "rows groups d"],
    ids: Int[Tensor, "rows groups k"],
    codes: Float[Tensor, "groups num_codes d"],
    commitment: float = 0.0,
    reconstruction: float = 0.0,
    n_tokens: int | None = None,
) -> Float[Tensor, "rows groups d"]:
    """The mean of the chosen codes, with the snap's gradients (see `_GatherStraightThrough`).

    Value: `gather_mean(ids, codes)`, except that a row of `x` holding a NaN or inf comes out
    all NaN (NaN in, NaN out, as from any torch layer) rather than hidden behind the arbitrary
    code a NaN score picks. Safe to edit in place, also when gradients are on.
    """
    n = x.shape[0] if n_tokens is None else n_tokens
    flat = _GatherStraightThrough.apply(
        x, codes, ids, float(commitment), float(reconstruction), max(n, 1)
    )
    return flat.view(*ids.shape[:2], codes.shape[-1])


def snap(
    x: Float[Tensor, "rows groups d"],
    codes: Float[Tensor, "groups num_codes d"],
    k: int,
    similarity: str = "inner_product",
    chunk_size: int = 1024,
    commitment: float = 0.0,
    reconstruction: float = 1.0,
    disabled: Bool[Tensor, "groups num_codes"] | None = None,
) -> tuple[Float[Tensor, "rows groups d"], Int[Tensor, "rows groups k"]]:
    """The whole snap on grouped rows: (output, ids)."""
    ids = select_codes(x, codes, k, similarity, chunk_size, disabled)
    return snap_output(x, ids, codes, commitment, reconstruction), ids
