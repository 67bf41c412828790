# %% [markdown]
# # Joint fine-tuning: the paper's method
#
# Tutorial 02 trained codebooks on a frozen model. Each codebook there only learns to copy its
# input, and the small errors of many codebooks add up downstream. The codebook-features paper
# instead *fine-tunes the model with its codebooks in place*: the next-token loss flows through
# every codebook (straight-through gradients) into the model's weights and the codes together,
# so the network learns to compute with discrete codes. With a codebook at every attention head
# and every MLP output and only one active code each (k = 1), the fine-tuned model loses almost
# nothing against the original.
#
# This tutorial
#
# 1. trains a small TokFSM model (plain language-model training through the same trainer);
# 2. inserts codebooks at every layer's `attn.hook_z` (one group per head) and `hook_mlp_out`,
#    k = 1, and measures the loss right after insertion;
# 3. fine-tunes jointly (`mode="joint"`), with checkpoints, stopping half-way and resuming;
# 4. compares held-out loss and transition accuracy of the base and the codebook model, and
#    plots the training curves.

# %%
import dataclasses
import os
import shutil
import time
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from tl_codebook import HookedCodebookTransformer
from tl_codebook.fsm import (
    FSM,
    ExperimentConfig,
    TokFSMDataset,
    next_token_loss,
    sample_transition_accuracy,
)
from tl_codebook.fsm.evaluation import loss_floor
from tl_codebook.training import TrainConfig, train_codebooks
from tl_codebook.training.metrics_log import read_metrics

warnings.filterwarnings("ignore", message="HookedTransformer is deprecated")  # TL 3.9 notice
SIZE = os.environ.get("TL_CODEBOOK_EXAMPLE_SIZE", "full")
OUT = Path(os.environ.get("TL_CODEBOOK_EXAMPLE_OUT", "runs/examples")) / "03_joint_finetuning"
OUT.mkdir(parents=True, exist_ok=True)
torch.manual_seed(0)
started = time.perf_counter()

# %% [markdown]
# ## A base model
#
# The same TokFSM set-up as tutorial 02: a random state machine written as digits, and a small
# rotary transformer trained on its walks by `train_codebooks` in joint mode with no codebook
# sites (ordinary next-token training). `toy` runs in seconds for the test suite; `full` gives
# the numbers worth reading.

# %%
if SIZE == "toy":
    shape = dict(n_states=6, n_edges=2, base=3)
    shape.update(seq_len=16, n_layers=1, d_model=32, n_heads=2, d_mlp=64)
    base_steps, joint_steps, batch_size, num_codes = 300, 40, 32, 24
    checkpoint_every, n_held_out, n_samples = 10, 64, 32
else:
    shape = dict(n_states=32, n_edges=4, base=10)
    shape.update(seq_len=32, n_layers=2, d_model=64, n_heads=4, d_mlp=256)
    base_steps, joint_steps, batch_size, num_codes = 600, 300, 64, 128
    checkpoint_every, n_held_out, n_samples = 50, 512, 200

# the TokFSM demo's model family (rotary, LayerNorm, GELU) at this size; tutorial 02 spells out
# the same HookedTransformerConfig field by field
shape_config = ExperimentConfig(**shape)
seq_len = shape_config.seq_len
fsm = FSM.generate(shape_config.fsm_config())
held_out = TokFSMDataset(fsm, seq_len=seq_len, seed=0).held_out(n_held_out)
model_cfg = shape_config.model_config(fsm.vocab_size, "cpu")
base = HookedCodebookTransformer(model_cfg)
base_result = train_codebooks(
    base,
    TokFSMDataset(fsm, seq_len=seq_len, seed=0).batches(batch_size),
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
base_weights = {k: v.clone() for k, v in base.state_dict().items()}
base_loss = next_token_loss(base, held_out)
floor = loss_floor(fsm, seq_len)
print(f"{fsm}; base model trained in {base_result.seconds:.0f}s")
print(f"held-out loss: base {base_loss:.4f} (the task's floor: {floor:.4f})")


def copy_of_base():
    """A fresh model with the base model's weights and no codebooks."""
    model = HookedCodebookTransformer(model_cfg)
    model.load_state_dict(base_weights)
    return model


# %% [markdown]
# ## The codebook sites and the training config
#
# The paper's TokFSM setting puts a codebook at every attention head (`attn.hook_z:group`: one
# codebook group per head, so each head chooses its own code) and at every MLP output
# (`hook_mlp_out`), in every layer; each keeps one code per token (`k=1`). Codes start at
# k-means centres of the base model's activations at each site (BOS positions left out: they are
# outliers), which keeps the inserted model close to the base model from the first step.
#
# In joint mode the codebooks train at `lr` and the model's own weights at
# `lr * model_lr_factor`. A constant schedule after warm-up (the paper's) means a run can be
# extended later; cosine and linear schedules decay over `steps`, so a resumed run must keep the
# same `steps`.
#
# `out_dir` gets the run's `metrics.jsonl` and, every `checkpoint_every` steps, an atomic
# checkpoint (codes, model weights, optimizer, random state, data position). We start from an
# empty directory: an old run's checkpoints would be resumed from.

# %%
run_dir = OUT / "joint"
shutil.rmtree(run_dir, ignore_errors=True)
joint_config = TrainConfig(
    mode="joint",
    sites=["attn.hook_z:group", "hook_mlp_out"],
    num_codes=num_codes,
    k=1,
    steps=joint_steps,
    batch_size=batch_size,
    lr=1e-3,
    model_lr_factor=0.1,
    model_weight_decay=0.1,
    warmup_steps=joint_steps // 10,
    schedule="constant",
    codebook_init="kmeans",
    exclude_token_ids=[fsm.bos_token],
    checkpoint_every=checkpoint_every,
    out_dir=str(run_dir),
    log_every=5,
    seed=0,
    progress=False,
)


def joint_batches():
    """The fine-tuning data: a stream of its own, restarting from its seed at every call."""
    return TokFSMDataset(fsm, seq_len=seq_len, seed=1).batches(batch_size)


# %% [markdown]
# ## What inserting codebooks costs before any fine-tuning
#
# To see what fine-tuning buys, we first insert exactly the codebooks the joint run starts from
# and train nothing: the same sites, data, seed and k-means initialisation, then a single step
# at learning rate 0 (the trainer initialises codebooks on its first batches). Frozen mode keeps
# the model's weights out of it.

# %%
inserted = copy_of_base()
settings = {**joint_config.to_dict(), "mode": "frozen", "steps": 1, "lr": 0.0, "out_dir": None}
train_codebooks(inserted, joint_batches(), TrainConfig.from_dict(settings))
inserted_loss = next_token_loss(inserted, held_out)
print(f"{len(inserted.codebooks)} codebooks:", ", ".join(inserted.codebooks))
print(f"held-out loss with codebooks inserted, before fine-tuning: {inserted_loss:.4f}")

# %% [markdown]
# ## Fine-tuning, stopped half-way and resumed
#
# We train the first half of the steps, as if the process were killed there: all that is left is
# the run directory. Then a *new* model object (a fresh copy of the base model, as a new process
# would build it) continues with `resume=True` and the full number of steps. The trainer loads
# the latest checkpoint, puts the codebooks in place with their saved codes, restores the model
# weights, optimizer and random state, and skips the batches already consumed, so the result is
# the one an uninterrupted run would have given, bit for bit. It also refuses to resume with a
# config that would compute something else, or with other data.

# %%
half = joint_steps // 2
first_half = train_codebooks(
    copy_of_base(), joint_batches(), dataclasses.replace(joint_config, steps=half)
)
checkpoints = sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.is_dir())
print(f"first half: {first_half.steps} steps; checkpoints on disk: {checkpoints}")

model = copy_of_base()
result = train_codebooks(model, joint_batches(), joint_config, resume=True)
print(f"resumed at step {half}, finished at step {result.steps} ({result.seconds:.0f}s in all)")
assert result.steps == joint_steps and model.fine_tuned

# %% [markdown]
# At toy size we also check the claim itself: an uninterrupted run gives the very same codes and
# weights. (It costs a second full run, so the full-size tutorial skips it; the project's tests
# kill real runs at random steps and compare.)

# %%
if SIZE == "toy":
    straight = copy_of_base()
    train_codebooks(straight, joint_batches(), dataclasses.replace(joint_config, out_dir=None))
    for name, value in straight.state_dict().items():
        assert torch.equal(value, model.state_dict()[name]), name
    print("resumed run == uninterrupted run: every code and weight equal")

# %% [markdown]
# ## Base model vs codebook model
#
# Held-out next-token loss (lower is better, floor above), and transition accuracy: the fraction
# of state-to-state steps in sampled continuations that are edges of the FSM. Disabling the
# codebooks of the fine-tuned model shows the fine-tuned weights alone: they have adapted to
# computing with codes.

# %%
codebook_loss = next_token_loss(model, held_out)
with model.codebooks_disabled():
    weights_only_loss = next_token_loss(model, held_out)
base_accuracy = sample_transition_accuracy(base, fsm, n_samples=n_samples, prompt_states=1)
codebook_accuracy = sample_transition_accuracy(model, fsm, n_samples=n_samples, prompt_states=1)

for cb in model.codebooks.values():
    cb.reset_stats()
with torch.no_grad():
    model(held_out)
dead = sum(cb.dead_codes for cb in model.codebooks.values())
total = sum(cb.code_hits.numel() for cb in model.codebooks.values())

print(f"{'':44s} {'loss':>8s} {'transition acc.':>16s}")
print(f"{'base model':44s} {base_loss:8.4f} {base_accuracy.accuracy:16.3f}")
print(f"{'codebooks inserted, not fine-tuned':44s} {inserted_loss:8.4f}")
print(
    f"{'jointly fine-tuned, codebooks on':44s} {codebook_loss:8.4f} {codebook_accuracy.accuracy:16.3f}"
)
print(f"{'jointly fine-tuned, codebooks disabled':44s} {weights_only_loss:8.4f}")
print(f"{'task floor':44s} {floor:8.4f}")
print(f"dead codes on the held-out set: {dead} of {total} ({dead / total:.1%})")

if SIZE == "full":
    assert codebook_loss < inserted_loss, (codebook_loss, inserted_loss)
    assert codebook_loss < base_loss + 0.05, (codebook_loss, base_loss)
    assert codebook_accuracy.accuracy > 0.9, codebook_accuracy

# %% [markdown]
# At full size that is ten bottlenecks of one code each (4 heads and 1 MLP in each of 2
# layers), and the model predicts the walk about as well as before: the hidden state now lives
# in which codes are on. Tutorial 04 finds the code for each FSM state and switches it on to
# steer the model.
#
# ## The training curves
#
# The run's `metrics.jsonl` holds every logged step of both halves: a resumed run first drops
# lines logged after its checkpoint, so no step appears twice. The base model's curve comes from
# its `TrainResult.history`.

# %%
records = read_metrics(run_dir)
steps = [r["step"] for r in records]
assert steps == sorted(set(steps)) and steps[-1] == joint_steps
base_steps_logged = [10 * (i + 1) for i in range(len(base_result.history))]

fig, (ax_base, ax_joint) = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
ax_base.plot(base_steps_logged, [h["lm_loss"] for h in base_result.history], color="tab:blue")
ax_base.set_title("1. base model: next-token training")
ax_joint.plot(steps, [r["lm_loss"] for r in records], color="tab:orange", label="training loss")
ax_joint.axvline(half, color="grey", linestyle=":", label=f"stopped and resumed (step {half})")
ax_joint.axhline(inserted_loss, color="tab:red", linestyle="--", label="held-out, just inserted")
ax_joint.axhline(codebook_loss, color="tab:green", linestyle="--", label="held-out, fine-tuned")
ax_joint.set_title("2. joint fine-tuning with codebooks (k = 1)")
for ax in (ax_base, ax_joint):
    ax.axhline(base_loss, color="black", linestyle="--", linewidth=1, label="held-out, base model")
    ax.axhline(floor, color="grey", linewidth=1, label="task floor")
    ax.set_xlabel("training step")
    ax.grid(alpha=0.3)
ax_base.set_ylabel("next-token loss (nats)")
ax_base.set_ylim(floor - 0.05, max(inserted_loss, base_loss) + 0.4)
ax_joint.legend(fontsize=7)
fig.tight_layout()
figure = OUT / "training_curves.png"
fig.savefig(figure, dpi=100)
plt.close(fig)
print("saved", figure)

# %% [markdown]
# ## Saving the codebook model
#
# After joint training the model's own weights belong to the codebooks (`model.fine_tuned` is
# set), so `save_codebooks` writes them too (`model.safetensors`), and `load_codebooks` puts both
# back into any model of the same shape.

# %%
saved = model.save_codebooks(OUT / "codebook_model")
print("saved", saved, sorted(p.name for p in saved.iterdir()))
reloaded = HookedCodebookTransformer(model_cfg)
reloaded.load_codebooks(saved)
assert next_token_loss(reloaded, held_out) == codebook_loss
print("reloaded into a fresh model: the same held-out loss")
print(f"total time {time.perf_counter() - started:.0f}s")
