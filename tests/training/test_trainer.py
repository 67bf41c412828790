"""The trainer: frozen and joint modes reach known targets, hygiene works, runs resume exactly."""

import pytest
import torch

from tl_codebook import Codebook, CodebookConfig, HookedCodebookTransformer
from tl_codebook.training import TrainConfig, TrainingDivergedError, parse_site, train_codebooks
from tl_codebook.training.trainer import lr_factor

MLP = "blocks.1.hook_mlp_out"


def random_batches(seed=0, batch=8, seq=12, vocab=11):
    g = torch.Generator().manual_seed(seed)
    while True:
        yield torch.randint(0, vocab, (batch, seq), generator=g)


def counting_batches(seed=0, batch=16, seq=12, vocab=11):
    """Each row counts up mod vocab from a random start: learnable from the previous token."""
    g = torch.Generator().manual_seed(seed)
    while True:
        start = torch.randint(0, vocab, (batch, 1), generator=g)
        yield (start + torch.arange(seq)) % vocab


def eval_mse(model, name, tokens):
    cb = model.codebooks[name]
    cb.reset_stats()
    with torch.no_grad():
        model(tokens)
    mse = cb.mean_squared_error
    cb.reset_stats()
    return mse


def test_frozen_mode_cuts_reconstruction_error_and_keeps_base_weights(tiny_cfg):
    model = HookedCodebookTransformer(tiny_cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(0)
    model.add_codebook(Codebook(CodebookConfig(d_in=16, num_codes=32, k=2, hook_name=MLP)))
    held_out = next(random_batches(seed=99, batch=32))
    start = eval_mse(model, MLP, held_out)
    config = TrainConfig(
        mode="frozen",
        sites=[parse_site("hook_mlp_out:layers=1")],
        steps=150,
        lr=1e-2,
        progress=False,
    )
    train_codebooks(model, random_batches(), config)
    end = eval_mse(model, MLP, held_out)
    assert end < start / 5, (start, end)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.requires_grad for n, p in model.named_parameters())  # flags restored


def test_joint_mode_learns_a_counting_task_through_codebooks(tiny_cfg):
    model = HookedCodebookTransformer(tiny_cfg)
    config = TrainConfig(
        mode="joint",
        sites=[parse_site("hook_mlp_out"), parse_site("attn.hook_z:group")],
        num_codes=32,
        steps=200,
        lr=1e-2,
        codebook_init="activations",
        progress=False,
    )
    result = train_codebooks(model, counting_batches(), config)
    tokens = next(counting_batches(seed=5))
    loss = model(tokens, return_type="loss", loss_per_token=True)[:, 1:].mean()
    assert loss.item() < 0.35, loss.item()  # uniform guessing is ln 11 = 2.4
    assert model.fine_tuned and len(model.codebooks) == 4
    assert result.steps == 200


def test_kmeans_init_puts_codes_on_planted_clusters(tiny_cfg):
    """Inputs that sit on 4 distinct points: k-means codes land exactly on them."""
    model = HookedCodebookTransformer(tiny_cfg)
    site = "blocks.0.hook_resid_pre"  # embed + pos embed: one point per (token, position)
    tokens = torch.zeros(64, 2, dtype=torch.long)
    tokens[:, 0] = torch.arange(64) % 2
    tokens[:, 1] = 2 + torch.arange(64) % 2
    config = TrainConfig(
        mode="frozen",
        sites=[parse_site(site)],
        num_codes=4,
        steps=1,
        lr=0.0,
        codebook_init="kmeans",
        init_batches=1,
        progress=False,
    )
    train_codebooks(model, iter([tokens, tokens]), config)
    with torch.no_grad():
        points = model.embed(tokens[:2].flatten().view(2, 2)) + model.pos_embed(tokens[:2])
    points = points.reshape(-1, 16)
    codes = model.codebooks[site].codes[0]
    distances = torch.cdist(points, codes)
    assert distances.min(1).values.max() < 1e-4


def test_dead_code_replacement_revives_planted_dead_codes(tiny_cfg):
    model = HookedCodebookTransformer(tiny_cfg)
    torch.manual_seed(0)
    cb = model.add_codebook(Codebook(CodebookConfig(d_in=16, num_codes=16, k=1, hook_name=MLP)))
    tokens = next(random_batches(seed=3, batch=32))
    with torch.no_grad():
        acts = model.run_with_cache(tokens, names_filter=f"{MLP}.hook_codebook_in")[1]
        cb.init_from_activations(acts[f"{MLP}.hook_codebook_in"])
        cb.codes[0, 8:] = -50.0 * cb.codes[0, :8].mean(0)  # never the best match: dead
    cb.reset_stats()
    config = TrainConfig(
        mode="frozen",
        sites=[parse_site("hook_mlp_out:layers=1")],
        steps=12,
        lr=1e-3,
        dead_code_every=4,
        progress=False,
    )
    result = train_codebooks(model, random_batches(), config)
    assert result.history[-1]["codes_replaced"] >= 8  # the 8 planted dead codes, at least
    cb.reset_stats()
    with torch.no_grad():
        model(next(random_batches(seed=7, batch=64)))
    revived = (cb.code_hits[0, 8:] > 0).sum()
    assert revived >= 6, cb.code_hits


def test_resume_continues_exactly(tiny_cfg, tmp_path):
    def run(steps, out, resume=False):
        model = HookedCodebookTransformer(tiny_cfg)
        config = TrainConfig(
            mode="joint",
            sites=[parse_site("hook_mlp_out:k=2")],
            num_codes=16,
            steps=steps,
            lr=3e-3,
            checkpoint_every=5,
            dead_code_every=3,
            codebook_init="activations",
            out_dir=str(out),
            progress=False,
            log_every=5,
        )
        train_codebooks(model, counting_batches(), config, resume=resume)
        return model

    straight = run(10, tmp_path / "straight")
    run(5, tmp_path / "split")  # "killed" after its step-5 checkpoint
    resumed = run(10, tmp_path / "split", resume=True)
    for (name, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name
    lines = (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()
    assert [int(line.split('"step": ')[1].split(",")[0]) for line in lines] == [5, 10]


def test_resume_with_a_different_config_names_the_keys(tiny_cfg, tmp_path):
    model = HookedCodebookTransformer(tiny_cfg)
    base = dict(
        mode="frozen",
        sites=[parse_site("hook_mlp_out:layers=1")],
        num_codes=8,
        steps=2,
        checkpoint_every=2,
        out_dir=str(tmp_path),
        progress=False,
    )
    train_codebooks(model, random_batches(), TrainConfig(**base))
    other = HookedCodebookTransformer(tiny_cfg)
    with pytest.raises(ValueError, match=r"config differs \(lr: checkpoint 0.001 vs now 0.5"):
        train_codebooks(
            other, random_batches(), TrainConfig(**{**base, "lr": 0.5, "steps": 4}), resume=True
        )


def test_nan_loss_stops_with_a_diagnostic_checkpoint(tiny_cfg, tmp_path):
    model = HookedCodebookTransformer(tiny_cfg)
    cb = model.add_codebook(Codebook(CodebookConfig(d_in=16, num_codes=8, hook_name=MLP)))
    with torch.no_grad():
        cb.codes[0, :] = float("nan")
    config = TrainConfig(mode="joint", steps=5, out_dir=str(tmp_path), progress=False)
    with pytest.raises(
        TrainingDivergedError, match="Loss became nan at step 0; diagnostic checkpoint saved"
    ):
        train_codebooks(model, random_batches(), config)
    assert (tmp_path / "diagnostics" / "step-00000000" / "tensors.safetensors").exists()


@pytest.mark.parametrize(
    "spec, message",
    [
        ("hook_mlp_outt", "no hook point named 'blocks.0.hook_mlp_outt'.*blocks.0.hook_mlp_out"),
        ("hook_mlp_out:layers=5", r"Layer index\(es\) \[5\] out of range: the model has 2 layers"),
        ("hook_mlp_out:num_codes=0", "num_codes must be an integer >= 1"),
        ("attn.hook_z", "add ':group'"),
        ("hook_mlp_out:color=red", "unknown option 'color'"),
    ],
)
def test_bad_site_specs_fail_before_work(tiny_cfg, spec, message):
    model = HookedCodebookTransformer(tiny_cfg)
    with pytest.raises(ValueError, match=message):
        train_codebooks(
            model,
            random_batches(),
            TrainConfig(mode="frozen", sites=[parse_site(spec)], steps=1, progress=False),
        )
    assert model.codebooks == {}


def test_other_bad_inputs(tiny_cfg, tmp_path):
    model = HookedCodebookTransformer(tiny_cfg)
    with pytest.raises(ValueError, match="seq_len=64 is longer than the model's context n_ctx=32"):
        train_codebooks(model, random_batches(), TrainConfig(seq_len=64, steps=1, progress=False))
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(ValueError, match="is not writable"):
        train_codebooks(
            model,
            random_batches(),
            TrainConfig(out_dir=str(blocker / "run"), steps=1, progress=False),
        )
    with pytest.raises(
        ValueError, match="mode='frozn' is not one of frozen, joint. Did you mean 'frozen'"
    ):
        TrainConfig(mode="frozn")
    with pytest.raises(ValueError, match="give at least one site"):
        TrainConfig(mode="frozen")
    assert model.codebooks == {}


def test_lr_schedule_warmup_then_cosine():
    config = TrainConfig(steps=110, warmup_steps=10, schedule="cosine")
    assert lr_factor(0, config) == pytest.approx(0.1)
    assert lr_factor(9, config) == pytest.approx(1.0)
    assert lr_factor(60, config) == pytest.approx(0.5)
    assert lr_factor(110, config) == pytest.approx(0.0)
