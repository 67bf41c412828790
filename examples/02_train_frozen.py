# %% [markdown]
# # Training codebooks on a frozen model
#
# The quickest way to get codes for a model you already have is to leave the model alone and
# train only the codebooks: each codebook learns to reconstruct the activations at its site,
# like a sparse autoencoder with exactly *k* active latents. This is `mode="frozen"` of the
# project's one trainer, `train_codebooks`.
#
# In this tutorial we
#
# 1. train a small transformer on TokFSM, the paper's synthetic task (the same trainer with no
#    codebook sites is plain language-model training);
# 2. train frozen codebooks at two kinds of site of that model: the residual stream after each
#    block, and each attention head's output (`attn.hook_z`, one codebook group per head);
# 3. measure what they cost: reconstruction quality, next-token loss with and without the
#    codebooks, dead codes;
# 4. plot the training curves from the trainer's metrics.
#
# On a real model you would do the same with a pretrained one
# (`HookedCodebookTransformer.from_pretrained("gpt2")`, needs internet) and a text dataset, or
# from the command line: `tl-codebook train --model gpt2 --mode frozen --at hook_resid_post ...`.

# %%
import json
import os
import time
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from transformer_lens import HookedTransformerConfig

from tl_codebook import HookedCodebookTransformer
from tl_codebook.fsm import FSM, FSMConfig, TokFSMDataset, next_token_loss
from tl_codebook.fsm.evaluation import loss_floor
from tl_codebook.training import TrainConfig, train_codebooks

warnings.filterwarnings("ignore", message="HookedTransformer is deprecated")  # TL 3.9 notice
SIZE = os.environ.get("TL_CODEBOOK_EXAMPLE_SIZE", "full")
OUT = Path(os.environ.get("TL_CODEBOOK_EXAMPLE_OUT", "runs/examples")) / "02_train_frozen"
OUT.mkdir(parents=True, exist_ok=True)
torch.manual_seed(0)
started = time.perf_counter()

# %% [markdown]
# ## The task and the base model
#
# TokFSM is a random finite state machine: `n_states` states, each with `n_edges` equally likely
# successors, a walk through it written as the digits of each state. To predict the next digit
# a model has to know which state it is in, a hidden variable with a known ground truth, which
# is what makes it a good testbed for interpretability (tutorial 04 finds the codes for states).
#
# `toy` is a seconds-long setting for the test suite; `full` is the setting whose numbers are
# worth reading (about a minute on a laptop CPU).

# %%
if SIZE == "toy":
    fsm_cfg = FSMConfig(n_states=6, n_edges=2, base=3, seed=0)
    seq_len, n_layers, d_model, n_heads, d_mlp = 16, 1, 32, 2, 64
    base_steps, frozen_steps, batch_size, num_codes, n_held_out = 300, 60, 32, 32, 64
else:
    fsm_cfg = FSMConfig(n_states=32, n_edges=4, base=10, seed=0)
    seq_len, n_layers, d_model, n_heads, d_mlp = 32, 2, 64, 4, 256
    base_steps, frozen_steps, batch_size, num_codes, n_held_out = 600, 400, 64, 256, 512

fsm = FSM.generate(fsm_cfg)
dataset = TokFSMDataset(fsm, seq_len=seq_len, seed=0)
held_out = dataset.held_out(n_held_out)  # a fixed set no training stream draws from
print(fsm, f"- {fsm.digits_per_state} digits per state, vocabulary {fsm.vocab_size} (digits + BOS)")
print("a held-out sequence:", held_out[0].tolist())

model_cfg = HookedTransformerConfig(
    n_layers=n_layers,
    d_model=d_model,
    n_heads=n_heads,
    d_head=d_model // n_heads,
    d_mlp=d_mlp,
    n_ctx=seq_len,
    d_vocab=fsm.vocab_size,
    act_fn="gelu",
    normalization_type="LN",
    positional_embedding_type="rotary",
    seed=0,
    device="cpu",
)
model = HookedCodebookTransformer(model_cfg)

# %% [markdown]
# The trainer takes any iterable of token batches (`Int[Tensor, "batch pos"]`); a TokFSM dataset
# gives an endless seeded stream. `mode="joint"` with no codebook sites trains every weight of
# the model on the next-token loss: ordinary language-model training, with the same schedule,
# checkpoints and logging as codebook training.

# %%
base_result = train_codebooks(
    model,
    dataset.batches(batch_size),
    TrainConfig(
        mode="joint",
        sites=[],
        steps=base_steps,
        batch_size=batch_size,
        lr=3e-3,
        warmup_steps=base_steps // 10,
        schedule="cosine",
        min_lr_fraction=0.1,
        model_weight_decay=0.1,
        log_every=10,
        seed=0,
        progress=False,
    ),
)
base_loss = next_token_loss(model, held_out)
print(f"base model: {base_result.steps} steps in {base_result.seconds:.1f}s")
print(f"held-out next-token loss {base_loss:.4f}")

# %% [markdown]
# What is a good loss here? The first state of a walk is uniformly random (log N nats over its
# digits) and every later one a uniform choice among its E successors (log E nats), so no model
# can beat the walk's entropy per predicted token, `loss_floor`:

# %%
floor = loss_floor(fsm, seq_len)
print(f"loss floor {floor:.4f}: the base model is {base_loss - floor:.4f} nats above it")
if SIZE == "full":
    assert base_loss < floor + 0.05, (base_loss, floor)

# %% [markdown]
# ## Frozen codebook training
#
# Sites are named like the command line's `--at`: `hook_resid_post` (at every layer, `layers`
# picks some), and `attn.hook_z:group`, one codebook group per attention head. Settings per
# site can follow after colons (`"hook_resid_post:k=4"`); the rest come from the `TrainConfig`.
#
# What `mode="frozen"` does at each step: it runs the model with the codebooks in place, and each
# codebook's loss is the MSE between the mean of its chosen codes and its own input. Only the
# codes get gradients; the model's weights are not touched. Two choices that matter on a real
# model:
#
# - `codebook_init="kmeans"` starts every code at a k-means centre of the site's activations
#   (from the first `init_batches` batches). Random Gaussian codes have the wrong scale for most
#   activations and many never get chosen. BOS positions are left out of the initialisation:
#   their activations are outliers (`exclude_token_ids`).
# - `dead_code_every=N` re-seeds codes that no token chose in the last N steps at recent inputs.
#
# `kl_coef > 0` would add the KL divergence between the base model's and the codebook model's
# next-token distributions to the loss, so codes also learn what matters downstream.

# %%
weights_before = {k: v.clone() for k, v in model.state_dict().items()}
frozen_config = TrainConfig(
    mode="frozen",
    sites=["hook_resid_post:k=4", "attn.hook_z:group"],
    num_codes=num_codes,
    k=1,
    steps=frozen_steps,
    batch_size=batch_size,
    lr=1e-3,
    warmup_steps=frozen_steps // 10,
    schedule="cosine",
    codebook_init="kmeans",
    exclude_token_ids=[fsm.bos_token],
    dead_code_every=50,
    log_every=5,
    out_dir=str(OUT / "train"),
    seed=0,
    progress=False,
)
result = train_codebooks(
    model, TokFSMDataset(fsm, seq_len=seq_len, seed=1).batches(batch_size), frozen_config
)
print(f"{result.steps} steps, {result.tokens} tokens in {result.seconds:.1f}s")
for name, cb in model.codebooks.items():
    print(f"  {name}: {cb.cfg.n_groups} group(s) x {cb.cfg.num_codes} codes, k={cb.cfg.k}")

same = all(
    torch.equal(v, weights_before[k]) for k, v in model.state_dict().items() if k in weights_before
)
assert same, "frozen training must leave the model's weights as they were"
print("the model's own weights are unchanged")

# %% [markdown]
# ## What the codebooks cost
#
# Three questions for each codebook, answered on the held-out sequences:
#
# - **Reconstruction**: the fraction of the activation's variance the codebook output explains,
#   `1 - |out - in|^2 / |in - mean(in)|^2`, read from `run_with_cache`.
# - **Loss**: the held-out next-token loss with only this codebook in place, against the base
#   model (`codebooks_disabled()` gives the base model exactly) and against all codebooks at once.
# - **Dead codes**: codes that no held-out token chooses (each codebook counts its hits).


# %%
def variance_explained(model, site, tokens):
    names = [f"{site}.hook_codebook_in", f"{site}.hook_codebook_out"]
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=names)
    x, out = (cache[n].flatten(2) for n in names)
    x, out = x[:, 1:], out[:, 1:]  # leave out BOS, as the training did
    residual = (out - x).pow(2).sum()
    total = (x - x.mean(dim=(0, 1))).pow(2).sum()
    return 1 - (residual / total).item()


with model.codebooks_disabled():
    disabled_loss = next_token_loss(model, held_out)
assert disabled_loss == base_loss  # the very same computation
all_loss = next_token_loss(model, held_out)

rows = []
for site in model.codebooks:
    others = [name for name in model.codebooks if name != site]
    cb = model.codebooks[site]
    with model.codebooks_disabled(others):
        cb.reset_stats()
        loss = next_token_loss(model, held_out)
        dead = cb.dead_fraction
        fve = variance_explained(model, site, held_out)
    rows.append({"site": site, "variance_explained": fve, "loss": loss, "dead_fraction": dead})

print(f"{'site':28s} {'var. explained':>14s} {'loss':>8s} {'dead codes':>10s}")
for row in rows:
    print(
        f"{row['site']:28s} {row['variance_explained']:14.3f} {row['loss']:8.4f} "
        f"{row['dead_fraction']:10.1%}"
    )
print(f"{'base model (disabled)':28s} {'':14s} {base_loss:8.4f}")
print(f"{'all codebooks at once':28s} {'':14s} {all_loss:8.4f}")

# %% [markdown]
# Reading the table: a codebook that explains most of the variance at its site barely moves the
# loss. Residual-stream codebooks with `k=4` have more to reconstruct (everything the model
# knows at that point) than a single head's output with `k=1`. All codebooks together cost more
# than any one of them: each codebook's small error is passed on to the sites after it.
# Tutorial 03 removes most of that cost by fine-tuning the model with its codebooks in place.

# %%
for row in rows:
    assert 0.0 <= row["dead_fraction"] <= 1.0
    assert row["variance_explained"] <= 1.0
if SIZE == "full":
    assert all(row["variance_explained"] > 0.5 for row in rows), rows
    assert all(row["loss"] < base_loss + 0.5 for row in rows), (rows, base_loss)
    assert all_loss < base_loss + 1.0, (all_loss, base_loss)

# %% [markdown]
# ## The training curves
#
# The trainer logs every `log_every` steps: the total loss, each codebook's MSE term (`mse/...`)
# and its reconstruction error, and the fraction of codes not chosen since the last log
# (`dead_fraction/...`). The records are in `TrainResult.history`, and, because we gave an
# `out_dir`, also in `metrics.jsonl` there, one JSON object per line (what you would plot for
# a run started from the command line).

# %%
metrics_path = OUT / "train" / "metrics.jsonl"
records = [json.loads(line) for line in metrics_path.read_text().splitlines()]
assert len(records) == len(result.history)
assert [r["loss"] for r in records] == [h["loss"] for h in result.history]
print(f"{metrics_path}: {len(records)} records; keys of one:", sorted(records[-1])[:6], "...")

steps = [r["step"] for r in records]
fig, (ax_mse, ax_dead) = plt.subplots(1, 2, figsize=(11, 4))
for site in model.codebooks:
    ax_mse.plot(steps, [r[f"mse/{site}"] for r in records], label=site)
    ax_dead.plot(steps, [r[f"dead_fraction/{site}"] for r in records], label=site)
ax_mse.set_yscale("log")
ax_mse.set_xlabel("training step")
ax_mse.set_ylabel("reconstruction MSE (per dimension)")
ax_mse.set_title("Frozen codebook training: reconstruction")
ax_dead.set_xlabel("training step")
ax_dead.set_ylabel(f"codes unused in the last {frozen_config.log_every} steps")
ax_dead.set_title("Dead codes (re-seeded every 50 steps)")
ax_dead.set_ylim(0, 1)
for ax in (ax_mse, ax_dead):
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
fig.tight_layout()
figure = OUT / "training_curves.png"
fig.savefig(figure, dpi=100)
plt.close(fig)
print("saved", figure)

first, last = records[0], records[-1]
for site in model.codebooks:
    print(
        f"{site}: MSE {first[f'mse/{site}']:.4f} at step {first['step']} -> {last[f'mse/{site}']:.4f}"
    )
assert last["loss"] <= first["loss"] * 1.5  # k-means starts well; training must not blow it up

# %% [markdown]
# ## Keeping the codebooks
#
# `save_codebooks` writes the trained codebooks (safetensors + JSON). It also writes the model's
# own weights when the model is marked `fine_tuned`, which joint-mode training does, and our
# base model was trained here in joint mode. The codebooks were trained on exactly these frozen
# weights, so we save the codebooks alone and keep the base model's weights apart.

# %%
saved = model.save_codebooks(OUT / "codebooks", save_model_weights=False)
print("saved", saved, sorted(p.name for p in saved.iterdir()))
print(f"total time {time.perf_counter() - started:.0f}s")
