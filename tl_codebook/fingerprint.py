"""The identity of a model's weights, so a store or a code cache is only ever read for the model
it was built from (neutral ground: both `comparisons` and `analysis` import it)."""

from __future__ import annotations

import hashlib

import numpy as np
import torch
from torch import Tensor


def model_fingerprint(model: torch.nn.Module) -> str:
    """A short hash of a model's weights: names, shapes, dtypes and a strided sample of values.

    Cheap for large models (at most 4096 values per tensor are read), yet two differently trained
    models practically never collide. Codebook parameters (`*.codes`) are left out, so a model
    with codebooks attached has its base model's fingerprint.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if name.endswith(".codes") or not isinstance(tensor, Tensor):
            continue
        flat = tensor.detach().reshape(-1)
        step = max(1, flat.numel() // 4096)
        sample = flat[::step][:4096].to("cpu", torch.float64).numpy()
        digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
        digest.update(np.ascontiguousarray(sample).tobytes())
    return digest.hexdigest()[:16]


def model_name_of(model: torch.nn.Module) -> str:
    """The name a manifest records: `cfg.model_name` when the model has one, else its class."""
    cfg = getattr(model, "cfg", None)
    return str(getattr(cfg, "model_name", None) or type(model).__name__)
