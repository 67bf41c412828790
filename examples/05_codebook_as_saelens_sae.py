# %% [markdown]
# # A codebook as a SAELens SAE
#
# A codebook with *k* codes and mean aggregation replaces a hidden state `x` by the mean of the
# *k* code vectors most similar to it. Written as a sparse autoencoder, that is a **TopK SAE**
# whose encoder and decoder are tied (the encoder rows are the unit-normalised codes, the decoder
# rows the codes themselves), with no biases and with every active latent set to the constant
# `1/k`:
#
# $$\hat x = \sum_{i \in \mathrm{topk}(W_{enc}^\top x)} \tfrac{1}{k}\, W_{dec}[i].$$
#
# `tl_codebook` registers this as the SAELens architecture `"codebook"`, so `cb.to_sae()` turns
# any trained codebook into a `sae_lens.SAE`. Everything SAELens can do with an SAE then works
# on a codebook: splice it into a `HookedSAETransformer`, cache its latents, score it with
# `sae_lens.evals.run_evals`, save and reload it. This tutorial walks through all of it on a small
# model trained here, offline, in a few minutes on a CPU:
#
# 1. train a small TokFSM language model and a codebook on one of its residual streams;
# 2. convert the codebook with `to_sae()` and look at the SAE's weights;
# 3. splice it into a `HookedSAETransformer` and check that it reconstructs exactly what the
#    codebook outputs;
# 4. run SAELens' own evaluation on it;
# 5. convert it back with `sae_to_codebook`.
#
# Set `TL_CODEBOOK_EXAMPLE_SIZE=toy` for a seconds-long smoke run (the numbers then mean
# nothing); the default `full` size gives real results.

# %%
import os
import time
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # write PNGs; no display needed
import matplotlib.pyplot as plt
import torch
from datasets import Dataset
from sae_lens import SAE, HookedSAETransformer
from sae_lens.evals import get_eval_everything_config, run_evals
from sae_lens.training.activation_scaler import ActivationScaler
from sae_lens.training.activations_store import ActivationsStore

from tl_codebook.comparisons import CodebookSAE, sae_to_codebook
from tl_codebook.fsm import TokFSMDataset
from tl_codebook.fsm.task import TokFSMModelConfig, train_tokfsm_model
from tl_codebook.training import TrainConfig, train_codebooks

SIZE = os.environ.get("TL_CODEBOOK_EXAMPLE_SIZE", "full")
assert SIZE in ("toy", "full"), SIZE
OUT = (
    Path(os.environ.get("TL_CODEBOOK_EXAMPLE_OUT", "runs/examples")) / "05_codebook_as_saelens_sae"
)
OUT.mkdir(parents=True, exist_ok=True)
torch.manual_seed(0)
# SAELens warns that our small in-memory dataset is read more than once; that is intended here
warnings.filterwarnings("ignore", message="The training dataset contains fewer samples")
warnings.filterwarnings("ignore", message="To copy construct from a tensor")
STARTED = time.perf_counter()

if SIZE == "full":
    MODEL = TokFSMModelConfig(steps=400)  # 2 layers, d_model 64, a 32-state FSM
    NUM_CODES, K, CODEBOOK_STEPS, EVAL_SEQUENCES = 128, 4, 300, 256
else:
    MODEL = TokFSMModelConfig(n_layers=1, d_model=32, n_heads=2, d_mlp=64, steps=30, batch_size=32)
    NUM_CODES, K, CODEBOOK_STEPS, EVAL_SEQUENCES = 32, 2, 20, 32
HOOK = "blocks.0.hook_resid_post"
print(f"size={SIZE}: {MODEL}\noutputs under {OUT}")

# %% [markdown]
# ## 1. A model and a codebook
#
# We need a model that has learned something, without downloading one. TokFSM (the paper's
# synthetic task) is ideal: a random finite state machine whose states are written as digits,
# so a model predicting the next token must track a hidden state. `train_tokfsm_model` trains
# the small transformer that `tl-codebook compare` uses by default and returns it with its
# `TokFSMTask` (the data, the state labels, the BOS token).
#
# With internet access you would start from `HookedSAETransformer.from_pretrained("gpt2")`
# instead; nothing below depends on the model being small.

# %%
model, task = train_tokfsm_model(MODEL, OUT / "model", progress=False)
fsm = task.fsm
BOS = fsm.bos_token
print(f"{task}: vocabulary of {fsm.vocab_size} tokens (BOS = {BOS})")

# %% [markdown]
# Now a codebook on the residual stream after block 0, trained in **frozen** mode: the model's
# weights stay fixed and only the codes learn to reconstruct the activations (each codebook's
# own reconstruction MSE). Codes start as k-means centres of real activations; BOS positions,
# whose activations are outliers, are left out of the initialisation. `train_codebooks` puts the
# codebook into the model at `HOOK` and returns it.

# %%
batches = TokFSMDataset(fsm, seq_len=task.seq_len, seed=1).batches(64)  # an endless stream
result = train_codebooks(
    model,
    batches,
    TrainConfig(
        mode="frozen",
        sites=[HOOK],
        num_codes=NUM_CODES,
        k=K,
        steps=CODEBOOK_STEPS,
        batch_size=64,
        lr=3e-3,
        codebook_init="kmeans",
        init_batches=4,
        exclude_token_ids=[BOS],
        seed=0,
        progress=False,
        log_every=max(1, CODEBOOK_STEPS // 5),
    ),
)
codebook = result.codebooks[HOOK]
codebook.eval()
print(codebook)
print(f"final reconstruction loss {result.final_loss:.4f} after {result.steps} steps")

# %% [markdown]
# Before converting anything, record what the codebook itself does on held-out sequences: the
# codes it picks (`hook_codes`), what it outputs (`hook_codebook_out`) and the model's logits.
# These are the known answers the SAE must reproduce.

# %%
eval_tokens = task.tokens(EVAL_SEQUENCES, "eval", seed=0)
with torch.no_grad():
    cb_logits, cb_cache = model.run_with_cache(eval_tokens)
cb_codes = cb_cache[f"{HOOK}.hook_codes"]  # [batch, pos, n_groups=1, k]
cb_out = cb_cache[f"{HOOK}.hook_codebook_out"]  # [batch, pos, d_model]
resid = cb_cache[f"{HOOK}.hook_codebook_in"]  # the model's own activation
print("codes at the first sequence's first 6 positions:", cb_codes[0, :6, 0].tolist())

# %% [markdown]
# ## 2. `to_sae()`: the codebook as a SAELens SAE
#
# `codebook.to_sae()` copies the codes into a `CodebookSAE` (a subclass of `sae_lens.SAE`,
# architecture `"codebook"`). Its only parameter is `codes`; `W_enc`, `W_dec`, `b_enc` and
# `b_dec` are read-only views derived from it, so the SAE and the codebook cannot drift apart.
# The config carries the hook name, so SAELens knows where the SAE belongs.

# %%
sae = codebook.to_sae()
assert isinstance(sae, CodebookSAE) and sae.cfg.architecture() == "codebook"
print(
    f"architecture={sae.cfg.architecture()!r} d_in={sae.cfg.d_in} d_sae={sae.cfg.d_sae} "
    f"k={sae.cfg.k} hook={sae.cfg.metadata.hook_name!r}"
)
codes = codebook.codes.detach()[0]  # [num_codes, d_model] (one group)
assert torch.equal(sae.W_dec, codes)  # decoder rows are the codes
unit = codes / codes.norm(dim=-1, keepdim=True)
assert torch.allclose(sae.W_enc, unit.T, atol=1e-6)  # encoder: tied, unit-normalised
assert not sae.b_enc.any() and not sae.b_dec.any()  # no biases
print("W_dec == codes, W_enc == unit-normalised codes (transposed), b_enc == b_dec == 0")

# %% [markdown]
# `encode` returns dense SAELens activations, `[..., d_sae]`: `1/k` at the *k* chosen codes and
# 0 elsewhere, so the L0 of every token is exactly *k*. The chosen latents are the very codes
# the codebook picked, and `decode(encode(x))` is the codebook's output.

# %%
with torch.no_grad():
    acts = sae.encode(resid)
    recon = sae.decode(acts)
assert torch.equal((acts != 0).sum(-1), torch.full(acts.shape[:-1], K))  # L0 = k everywhere
assert torch.allclose(acts[acts != 0], torch.tensor(1.0 / K))  # every active value is 1/k
active = acts.nonzero()[:, -1].reshape(*acts.shape[:-1], K).sort(-1).values
assert torch.equal(active, cb_codes[..., 0, :].sort(-1).values)  # the same codes
recon_error = (recon - cb_out).abs().max().item()
assert recon_error < 1e-5, recon_error
print(f"L0 = {K} on every token; max |decode(encode(x)) - codebook(x)| = {recon_error:.2e}")

# %% [markdown]
# ## 3. Splicing it into a `HookedSAETransformer`
#
# SAELens splices SAEs into a `HookedSAETransformer` (a `HookedTransformer` subclass). Ours is
# the same network: we copy the trained weights into one, after taking the codebook out of the
# TransformerLens model (`remove_codebooks` puts the original hook point back, so the weights are
# the plain model's again).
#
# `run_with_cache_with_saes` attaches the SAE for one forward pass. SAELens' wrapper has hook
# points of its own, cached under the site's name: `hook_sae_acts_post` (the latents) and
# `hook_sae_recons` (the reconstruction). With the SAE in place the logits must equal those of
# the model with its codebook.

# %%
removed = model.remove_codebooks(HOOK)[HOOK]
assert removed is codebook
sae_model = HookedSAETransformer(model.cfg)
sae_model.load_state_dict(model.state_dict())
sae_model.eval()

with torch.no_grad():
    sae_logits, sae_cache = sae_model.run_with_cache_with_saes(eval_tokens, saes=[sae])
    plain_logits = sae_model(eval_tokens)  # the SAE is gone again after the call
spliced = sae_cache[f"{HOOK}.hook_sae_recons"]
latents = sae_cache[f"{HOOK}.hook_sae_acts_post"]
recon_error = (spliced - cb_out).abs().max().item()
logit_error = (sae_logits - cb_logits).abs().max().item()
assert recon_error < 1e-5 and logit_error < 1e-4, (recon_error, logit_error)
assert torch.equal(latents.nonzero()[:, -1].reshape(-1, K).sort(-1).values, active.reshape(-1, K))
print(
    f"HookedSAETransformer + codebook SAE vs model + codebook: max |recons diff| = "
    f"{recon_error:.2e}, max |logit diff| = {logit_error:.2e}"
)
print(f"(the plain model differs from both by up to {(plain_logits - cb_logits).abs().max():.3f})")

# %% [markdown]
# `add_sae` attaches an SAE until `reset_saes`; every TransformerLens tool then sees it. With
# `use_error_term=True` SAELens adds back the reconstruction error, so the model computes exactly
# its clean output while the latents stay inspectable: the usual way to study features without
# changing behaviour.

# %%
sae_model.add_sae(sae, use_error_term=True)
with torch.no_grad():
    logits_with_error_term, cache = sae_model.run_with_cache(eval_tokens)
assert "blocks.0.hook_resid_post.hook_sae_acts_post" in cache
assert torch.allclose(logits_with_error_term, plain_logits, atol=1e-4)
sae_model.reset_saes()
print("with use_error_term=True the spliced model reproduces the clean logits")

# %% [markdown]
# ## 4. SAELens' own evaluation: `run_evals`
#
# `run_evals` reads token batches from a SAELens `ActivationsStore`. Offline we build the store
# from an in-memory `datasets.Dataset` of our held-out sequences (each already starts with BOS,
# so SAELens must not prepend another). Two batches cover the data exactly once; the sparsity
# and variance pass reads the next two batches, which wrap around to the same sequences.
#
# The model has no tokenizer, so we name the special tokens ourselves:
# `exclude_special_tokens=[BOS]` leaves BOS positions out of every metric.
#
# The metrics (SAELens' definitions):
#
# - `explained_variance`: `1 - E‖x - x̂‖² / (E‖x‖² - ‖E x‖²)`, the share of the activations'
#   variance the reconstruction keeps;
# - `mse`: `E‖x - x̂‖²`, summed over dimensions, averaged over tokens;
# - `ce_loss_score`: `(CE_ablation - CE_sae) / (CE_ablation - CE_clean)`, how much of the
#   next-token loss lost by zeroing the activation the spliced SAE recovers (1 = all of it);
# - `kl_div_with_sae`: the mean KL divergence of the spliced model's next-token distribution
#   from the clean model's;
# - `l0`: active latents per token (exactly *k* here).

# %%
sae.cfg.metadata.prepend_bos = False
half = EVAL_SEQUENCES // 2
store = ActivationsStore.from_sae(
    sae_model,
    sae,
    Dataset.from_dict({"tokens": eval_tokens.tolist()}),
    context_size=eval_tokens.shape[1],
    streaming=False,
    store_batch_size_prompts=half,
    n_batches_in_buffer=1,
    train_batch_size_tokens=256,
    total_tokens=eval_tokens.numel(),
)
eval_config = get_eval_everything_config(
    batch_size_prompts=half, n_eval_reconstruction_batches=2, n_eval_sparsity_variance_batches=2
)
metrics, feature_metrics = run_evals(
    sae, store, sae_model, ActivationScaler(), eval_config, exclude_special_tokens=[BOS]
)
flat = {name: value for group in metrics.values() for name, value in group.items()}
for name in (
    "explained_variance",
    "mse",
    "l0",
    "ce_loss_score",
    "ce_loss_without_sae",
    "ce_loss_with_sae",
    "ce_loss_with_ablation",
    "kl_div_with_sae",
    "kl_div_score",
):
    print(f"{name:>22}: {flat[name]:.4f}")

# %% [markdown]
# Two of these we can check by hand. L0 is *k* by construction. Explained variance follows from
# the codebook's own output on the non-BOS tokens, with SAELens' formula.

# %%
keep = eval_tokens != BOS
x, x_hat = resid[keep].double(), cb_out[keep].double()
mse = (x - x_hat).pow(2).sum(-1).mean()
variance = x.pow(2).sum(-1).mean() - x.mean(0).pow(2).sum()
by_hand = (1 - mse / variance).item()
print(f"explained variance by hand {by_hand:.6f}, SAELens {flat['explained_variance']:.6f}")
assert abs(by_hand - flat["explained_variance"]) < 1e-4
assert flat["l0"] == K
if SIZE == "full":  # a trained codebook keeps most of the variance and of the loss
    assert flat["explained_variance"] > 0.8, flat["explained_variance"]
    assert flat["ce_loss_score"] > 0.9, flat["ce_loss_score"]

# %% [markdown]
# `run_evals` also returns per-latent statistics. `feature_density` is how often each latent is
# active; for a codebook it must be each code's firing frequency. The plot puts SAELens' density
# against the codebook's own counts: every code sits on the diagonal.

# %%
density = torch.tensor(feature_metrics["feature_density"])
with torch.no_grad():
    chosen = codebook.encode(resid[keep])  # [tokens, 1, k]
counts = torch.bincount(chosen.flatten(), minlength=NUM_CODES).double() / keep.sum()
assert torch.allclose(density.double(), counts, atol=1e-6)

fig, ax = plt.subplots(figsize=(5.5, 5))
ax.scatter(counts.numpy(), density.numpy(), s=14, alpha=0.7)
top = float(max(counts.max(), density.max())) * 1.05
ax.plot([0, top], [0, top], color="gray", linestyle="--", linewidth=1, label="y = x")
ax.set_xlabel("code firing frequency (codebook.encode)")
ax.set_ylabel("feature_density (sae_lens run_evals)")
ax.set_title(f"{NUM_CODES} codes, k = {K}: {int((counts == 0).sum())} never fire")
ax.legend()
fig.tight_layout()
figure = OUT / "feature_density.png"
fig.savefig(figure, dpi=110)
plt.close(fig)
print(f"figure: {figure}")

# %% [markdown]
# ## 5. Saving, loading and converting back
#
# A codebook SAE saves and loads like any SAELens SAE (`save_model` / `SAE.load_from_disk`, with
# `cfg.json` and `sae_weights.safetensors`): the registered architecture tells SAELens which
# class to build. `sae_to_codebook` turns it back into a `Codebook` with the same config and
# codes, ready for `HookedCodebookTransformer.add_codebook`, `force_codes` and the code cache.

# %%
sae.save_model(OUT / "codebook_sae")
reloaded = SAE.load_from_disk(str(OUT / "codebook_sae"))
assert isinstance(reloaded, CodebookSAE) and torch.equal(reloaded.codes, sae.codes)

back = sae_to_codebook(reloaded)
assert back.cfg == codebook.cfg, (back.cfg, codebook.cfg)
assert torch.equal(back.codes, codebook.codes)
with torch.no_grad():
    assert torch.equal(back.encode(resid), codebook.encode(resid))
print(f"saved to {OUT / 'codebook_sae'}; reloaded and converted back: same config, same codes")
print(f"done in {time.perf_counter() - STARTED:.1f} s")
