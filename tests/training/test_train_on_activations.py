"""`train_codebooks_on_activations`: the trainer on cached activation rows, no model."""

import pytest
import torch

from tl_codebook import Codebook, CodebookConfig
from tl_codebook.training import TrainConfig, train_codebooks_on_activations


def clustered_rows(seed=0, batch=64, d=8, centres=None):
    """Rows near 4 well-separated centres: a codebook of 4 codes can reconstruct them."""
    g = torch.Generator().manual_seed(seed)
    centres = centres if centres is not None else 5.0 * torch.eye(d)[:4]
    while True:
        which = torch.randint(0, centres.shape[0], (batch,), generator=g)
        yield centres[which] + 0.05 * torch.randn(batch, d, generator=g)


def test_kmeans_init_then_training_reaches_the_cluster_noise_floor():
    cb = Codebook(CodebookConfig(d_in=8, num_codes=4, k=1, similarity="euclidean"))
    config = TrainConfig(
        mode="frozen", steps=30, lr=1e-2, codebook_init="kmeans", init_batches=2, progress=False
    )
    result = train_codebooks_on_activations(cb, clustered_rows(), config)
    mse = result.history[-1]["mse/codebook"]
    assert mse < 0.05**2 * 1.5, mse  # the noise variance per dim is 0.0025
    centres = 5.0 * torch.eye(8)[:4]
    assert torch.cdist(centres, cb.codes[0]).min(1).values.max() < 0.1
    assert result.steps == 30 and result.tokens == 30 * 64
    assert result.init_tokens == 2 * 64 and result.seconds > 0
    assert result.codebooks == {"codebook": cb}


def test_it_is_the_plain_adam_loop_with_saelens_mse_and_clipping():
    """Known answer: constant lr, no weight decay, grad_clip=1, MSE summed over dims and
    averaged over rows is exactly this hand-written Adam loop (the comparison's old loop)."""
    torch.manual_seed(0)
    cfg = CodebookConfig(d_in=8, num_codes=16, k=2, hook_name="blocks.0.hook_mlp_out")
    mine, reference = Codebook(cfg), Codebook(cfg)
    with torch.no_grad():
        reference.codes.copy_(mine.codes)
    config = TrainConfig(
        mode="frozen",
        steps=12,
        lr=3e-2,
        codebook_weight_decay=0.0,
        grad_clip=1.0,
        mse_reduction="sum_over_dims",
        progress=False,
    )
    train_codebooks_on_activations({"site": mine}, ({"site": x} for x in clustered_rows()), config)

    optimizer = torch.optim.Adam([reference.codes], lr=3e-2)
    for _, x in zip(range(12), clustered_rows()):
        loss = (reference.decode(reference.encode(x)) - x).pow(2).sum(-1).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_([reference.codes], 1.0)
        optimizer.step()
        optimizer.zero_grad()
    torch.testing.assert_close(mine.codes, reference.codes, rtol=0, atol=1e-6)
    assert not torch.equal(mine.codes, Codebook(cfg).codes)


def test_several_codebooks_and_an_exact_resume(tmp_path):
    def run(steps, out, resume=False, stop_after=None):
        torch.manual_seed(0)
        books = {
            "a": Codebook(CodebookConfig(d_in=8, num_codes=32, k=1)),
            "b": Codebook(CodebookConfig(d_in=8, num_codes=16, k=2, n_groups=2)),
        }

        def batches():
            for i, (x, y) in enumerate(zip(clustered_rows(1), clustered_rows(2))):
                if stop_after is not None and i == stop_after:
                    raise RuntimeError("killed")
                yield {"a": x, "b": y.view(-1, 2, 4)}

        config = TrainConfig(
            mode="frozen",
            steps=steps,
            lr=1e-2,
            schedule="cosine",
            codebook_init="activations",
            init_batches=1,
            dead_code_every=4,
            log_every=3,
            checkpoint_every=5,
            out_dir=str(out),
            progress=False,
        )
        return train_codebooks_on_activations(books, batches(), config, resume=resume)

    straight = run(20, tmp_path / "straight")
    with pytest.raises(RuntimeError, match="killed"):
        run(20, tmp_path / "split", stop_after=13)  # init batch + 12 steps; checkpoint at 10
    resumed = run(20, tmp_path / "split", resume=True)
    for name in ("a", "b"):
        assert torch.equal(straight.codebooks[name].codes, resumed.codebooks[name].codes), name
    assert resumed.history[-1]["codes_replaced"] == straight.history[-1]["codes_replaced"] > 0
    assert resumed.tokens == straight.tokens == 20 * 64


def test_bad_inputs_are_refused_with_the_reason():
    cb = Codebook(CodebookConfig(d_in=8, num_codes=4))
    frozen = TrainConfig(mode="frozen", steps=1, progress=False)
    with pytest.raises(ValueError, match="TrainConfig.mode must be 'frozen', got 'joint'"):
        train_codebooks_on_activations(cb, clustered_rows(), TrainConfig(steps=1))
    with pytest.raises(ValueError, match="TrainConfig.kl_coef has no meaning"):
        train_codebooks_on_activations(
            cb, clustered_rows(), TrainConfig(mode="frozen", kl_coef=1.0)
        )
    with pytest.raises(
        ValueError, match=r"rows for 'codebook' must be .*got dtype torch.float32 shape \(4, 5\)"
    ):
        train_codebooks_on_activations(cb, iter([torch.zeros(4, 5)]), frozen)
    with pytest.raises(ValueError, match=r"got keys \['x'\], the codebooks are \['a'\]"):
        train_codebooks_on_activations({"a": cb}, iter([{"x": torch.zeros(4, 8)}]), frozen)
    with pytest.raises(ValueError, match="The data ran out after 1 batches"):
        train_codebooks_on_activations(
            cb, iter([torch.zeros(4, 8)]), frozen.__class__(mode="frozen", steps=2, progress=False)
        )
