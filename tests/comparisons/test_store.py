"""The shared activation store: round trips, SAELens' reader, seeded batches, and bad stores."""

import json

import datasets
import pytest
import torch
from transformer_lens import HookedTransformer

from tl_codebook.comparisons.store import (
    MANIFEST,
    ActivationStore,
    StoreError,
    model_fingerprint,
)

RESID = "blocks.0.hook_resid_post"
HOOK_Z = "blocks.1.attn.hook_z"


@pytest.fixture
def model(tiny_cfg) -> HookedTransformer:
    return HookedTransformer(tiny_cfg).eval()


@pytest.fixture
def token_set() -> torch.Tensor:
    return torch.randint(0, 11, (21, 7), generator=torch.Generator().manual_seed(3))


@pytest.fixture
def store(model, token_set, tmp_path) -> ActivationStore:
    return ActivationStore.build(
        model,
        token_set,
        [RESID, HOOK_Z],
        tmp_path / "store",
        batch_size=4,
        shard_sequences=8,
        metadata={"note": "test"},
        progress=False,
    )


def test_round_trip_gives_the_models_activations_and_tokens(store, model, token_set) -> None:
    reopened = ActivationStore.open(store.path, model=model, hooks=[RESID, HOOK_Z])
    _, cache = model.run_with_cache(token_set)
    assert torch.equal(reopened.tokens(), token_set)
    assert torch.allclose(reopened.activations(RESID), cache[RESID], atol=1e-6)
    assert torch.allclose(reopened.activations(HOOK_Z), cache[HOOK_Z].flatten(-2), atol=1e-6)
    assert reopened.hook_shape(HOOK_Z) == (4, 4) and reopened.d_in(HOOK_Z) == 16
    m = reopened.manifest
    assert (m.n_sequences, m.context_size, m.n_tokens) == (21, 7, 147)
    assert [s.rows for s in m.shards] == [8, 8, 5]
    assert m.metadata == {"note": "test"} and m.model_fingerprint == model_fingerprint(model)


def test_write_from_tensors_round_trips(tmp_path) -> None:
    acts = torch.randn(5, 3, 2, 4)
    tokens = torch.arange(15).view(5, 3)
    store = ActivationStore.write(
        tmp_path / "s",
        {"h": acts},
        tokens,
        model_name="m",
        model_fingerprint="f",
        shard_sequences=2,
    )
    again = ActivationStore.open(tmp_path / "s")
    assert torch.equal(again.activations("h"), acts.flatten(-2))
    assert torch.equal(again.tokens(), tokens)
    assert store.hook_shape("h") == (2, 4)


def test_saelens_and_datasets_read_the_same_tensors(store, model, token_set) -> None:
    ds = datasets.load_from_disk(str(store.path))
    assert set(ds.column_names) == {RESID, HOOK_Z, "token_ids"} and len(ds) == 21
    sl = store.saelens_activations_store(RESID, 16, 1000, model=model, n_sequences_per_batch=4)
    acts, token_ids = sl.get_raw_llm_batch()
    assert torch.allclose(acts, store.activations(RESID)[:4].reshape(-1, 16), atol=1e-6)
    assert torch.equal(token_ids.long(), token_set[:4].reshape(-1))


def test_batches_are_seeded_and_cover_one_epoch_without_excluded_tokens(
    tmp_path, token_set
) -> None:
    index = torch.arange(token_set.numel(), dtype=torch.float32).view(*token_set.shape, 1)
    store = ActivationStore.write(
        tmp_path / "s", {"h": index.expand(-1, -1, 3)}, token_set, "m", "f", shard_sequences=8
    )
    first = list(store.batches("h", 10, seed=1, exclude_token_ids=[0, 5]))
    again = list(store.batches("h", 10, seed=1, exclude_token_ids=[0, 5]))
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    kept = (~torch.isin(token_set, torch.tensor([0, 5]))).flatten().nonzero().flatten()
    got = torch.cat(first)[:, 0].long()
    assert len(first) == len(kept) // 10 and got.unique().numel() == got.numel()
    assert bool(torch.isin(got, kept).all())
    other = torch.cat(list(store.batches("h", 10, seed=2, exclude_token_ids=[0, 5])))
    assert not torch.equal(torch.cat(first), other)


def test_batches_repeat_epochs_to_the_asked_token_count(store) -> None:
    sizes = [b.shape[0] for b in store.batches(RESID, 64, n_tokens=500)]
    assert sum(sizes) == 500 and sizes[:-1] == [64] * (len(sizes) - 1)
    # a sample never repeats tokens: at most every usable token once
    assert store.sample(RESID, 10_000, exclude_token_ids=[0]).shape == (store.count_tokens([0]), 16)


def test_a_store_for_another_model_or_hook_is_refused(store, tiny_cfg, make_tiny_cfg) -> None:
    other = HookedTransformer(make_tiny_cfg(seed=1))
    with pytest.raises(StoreError, match="built for model .* not for the model given"):
        ActivationStore.open(store.path, model=other)
    with pytest.raises(StoreError, match="no activations at 'blocks.1.hook_resid_post'.*holds"):
        ActivationStore.open(store.path, hooks=["blocks.1.hook_resid_post"])


def test_truncated_empty_and_missing_shards_are_refused(store) -> None:
    shard = store.path / store.manifest.shards[1].file
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(StoreError, match="data-00001-of-00003.arrow .* truncated"):
        ActivationStore.open(store.path)
    shard.write_bytes(b"")
    with pytest.raises(StoreError, match="data-00001-of-00003.arrow .* is empty"):
        ActivationStore.open(store.path)
    shard.unlink()
    with pytest.raises(StoreError, match="is missing"):
        ActivationStore.open(store.path)
    (store.path / MANIFEST).unlink()
    with pytest.raises(StoreError, match="not an activation store"):
        ActivationStore.open(store.path)


def test_a_corrupted_shard_of_the_right_size_is_refused_when_read(store) -> None:
    shard = store.path / store.manifest.shards[0].file
    data = bytearray(shard.read_bytes())
    data[:64] = bytes(64)
    shard.write_bytes(bytes(data))
    with pytest.raises(StoreError, match="cannot be read"):
        ActivationStore.open(store.path).tokens()


def test_bad_arguments_name_the_value(model, token_set, store, tmp_path) -> None:
    with pytest.raises(ValueError, match="store dtype=.bfloat16. is not one of float32"):
        ActivationStore.build(model, token_set, [RESID], tmp_path / "b", dtype="bfloat16")
    with pytest.raises(ValueError, match="no hook point named 'blocks.0.hook_resid_pots'"):
        ActivationStore.build(model, token_set, ["blocks.0.hook_resid_pots"], tmp_path / "c")
    with pytest.raises(StoreError, match="already exists"):
        ActivationStore.build(model, token_set, [RESID], store.path)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x.txt").write_text("mine")
    with pytest.raises(StoreError, match="not an activation store"):
        ActivationStore.build(model, token_set, [RESID], tmp_path / "d", overwrite=True)
    manifest = json.loads((store.path / MANIFEST).read_text())
    assert manifest["format"] == "tl_codebook.activation_store" and manifest["n_tokens"] == 147


def test_a_build_that_fails_half_way_leaves_the_previous_store_whole(store, model) -> None:
    """The store is built under a temporary name and swapped in whole (no half-written store)."""
    before = store.tokens()
    calls = []

    def fail_on_the_second_batch(act, hook):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("killed")

    other_tokens = torch.zeros(12, 7, dtype=torch.long)
    with model.hooks(fwd_hooks=[(RESID, fail_on_the_second_batch)]):
        with pytest.raises(RuntimeError, match="killed"):
            ActivationStore.build(
                model,
                other_tokens,
                [RESID],
                store.path,
                batch_size=4,
                overwrite=True,
                progress=False,
            )
    assert torch.equal(ActivationStore.open(store.path).tokens(), before)
    assert sorted(p.name for p in store.path.parent.iterdir()) == ["store"]  # no leftovers
