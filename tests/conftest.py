"""Shared test setup: nothing may reach the network, and small TransformerLens models to test on."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from transformer_lens import HookedTransformerConfig  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):
    # one torch thread per xdist worker: two workers x two threads on two cores run tiny ops
    # many times slower than one thread each
    torch.set_num_threads(1)


def tiny_config(**overrides) -> HookedTransformerConfig:
    """A 2-layer, d_model 16, 4-head model over 11 tokens: fast enough for every test."""
    kwargs = dict(
        n_layers=2,
        d_model=16,
        n_ctx=32,
        d_head=4,
        n_heads=4,
        d_mlp=32,
        d_vocab=11,
        act_fn="relu",
        seed=0,
        device="cpu",
    )
    kwargs.update(overrides)
    return HookedTransformerConfig(**kwargs)


@pytest.fixture
def tiny_cfg() -> HookedTransformerConfig:
    return tiny_config()


@pytest.fixture
def tokens() -> torch.Tensor:
    return torch.randint(0, 11, (3, 9), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="session")
def make_tiny_cfg():
    """Factory for `tiny_config(**overrides)` (test modules cannot import conftest directly)."""
    return tiny_config
