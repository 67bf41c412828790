# %% [markdown]
# # Codes in `run_with_cache`
#
# A codebook is a vector-quantization bottleneck placed at one hook point of a transformer: every
# hidden state that passes through it is replaced by the mean of the *k* code vectors most
# similar to it (Tamkin, Taufeeque & Goodman 2023, *Codebook Features*). The ids of those *k*
# codes are a sparse, discrete description of what the model is computing at that point.
#
# `tl_codebook` makes a codebook a TransformerLens `HookPoint` of its own. This tutorial shows
# what that buys you:
#
# 1. adding several codebooks to a `HookedTransformer` (a per-head codebook on `attn.hook_z`
#    and a residual-stream codebook);
# 2. reading codes, inputs and outputs of every codebook from `run_with_cache`;
# 3. hooks on the site's own name still work in `run_with_hooks`;
# 4. `codebooks_disabled()` gives back the base model, bit for bit;
# 5. saving and loading codebooks (safetensors + JSON), and `encode` / `decode`.
#
# Everything runs offline on a small randomly initialised model, so the codes here mean nothing
# yet (tutorials 02 and 03 train them). With internet access the same code works on a
# pretrained model: `HookedCodebookTransformer.from_pretrained("gpt2")`.

# %%
import os
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from transformer_lens import HookedTransformerConfig

from tl_codebook import Codebook, CodebookConfig, HookedCodebookTransformer

# TransformerLens 3.9 warns that HookedTransformer will be replaced in 4.0; not our concern here.
warnings.filterwarnings("ignore", message="HookedTransformer is deprecated")
SIZE = os.environ.get("TL_CODEBOOK_EXAMPLE_SIZE", "full")
OUT = (
    Path(os.environ.get("TL_CODEBOOK_EXAMPLE_OUT", "runs/examples")) / "01_codes_in_run_with_cache"
)
OUT.mkdir(parents=True, exist_ok=True)
torch.manual_seed(0)

# %% [markdown]
# ## A model to put codebooks in
#
# `HookedCodebookTransformer` is a `HookedTransformer` subclass: build it from a
# `HookedTransformerConfig` exactly as you would a `HookedTransformer` (or wrap an existing model
# with `HookedCodebookTransformer.from_model(model)`, which shares its weights). Until a codebook
# is added it *is* the plain model. We keep its logits on a fixed batch of tokens to compare
# against later.

# %%
cfg = HookedTransformerConfig(
    n_layers=2,
    d_model=64,
    n_heads=4,
    d_head=16,
    d_mlp=256,
    n_ctx=32,
    d_vocab=100,
    act_fn="gelu",
    normalization_type="LN",
    seed=0,
    device="cpu",
)
model = HookedCodebookTransformer(cfg)
model.eval()
n_seq = 8 if SIZE == "toy" else 64
tokens = torch.randint(
    0, cfg.d_vocab, (n_seq, cfg.n_ctx), generator=torch.Generator().manual_seed(1)
)
with torch.no_grad():
    base_logits = model(tokens)
base_weights = {k: v.clone() for k, v in model.state_dict().items()}
print("model:", cfg.n_layers, "layers, d_model", cfg.d_model, "| tokens:", tuple(tokens.shape))

# %% [markdown]
# ## Adding two codebooks
#
# A `CodebookConfig` says how wide the input is (`d_in`), how many codes there are, how many are
# active per token (`k`) and where it goes (`hook_name`). Two kinds of site:
#
# - **Per head.** `blocks.0.attn.hook_z` holds each head's output `[batch, pos, n_heads, d_head]`.
#   With `n_groups = n_heads` (and `d_in = n_heads * d_head`) the codebook is really four
#   independent codebooks, one per head, each choosing its own *k* codes. This is the paper's
#   attention-codebook setting.
# - **Flat.** `blocks.1.hook_resid_post` is `[batch, pos, d_model]`: one codebook over the whole
#   vector.
#
# New codes are Gaussian (norm about sqrt(d)), which does not match the scale of this model's
# activations. `init_from_activations` sets every code to a randomly chosen real activation, a
# much better start (the trainer also offers k-means, see tutorial 02). We read those
# activations from the base model with `run_with_cache`, before adding anything.

# %%
with torch.no_grad():
    _, base_cache = model.run_with_cache(
        tokens, names_filter=["blocks.0.attn.hook_z", "blocks.1.hook_resid_post"]
    )

z_codebook = Codebook(
    CodebookConfig(
        d_in=cfg.n_heads * cfg.d_head,
        num_codes=64,
        k=2,
        n_groups=cfg.n_heads,
        hook_name="blocks.0.attn.hook_z",
    )
)
resid_codebook = Codebook(
    CodebookConfig(d_in=cfg.d_model, num_codes=128, k=4, hook_name="blocks.1.hook_resid_post")
)
generator = torch.Generator().manual_seed(0)
z_codebook.init_from_activations(base_cache["blocks.0.attn.hook_z"], generator=generator)
resid_codebook.init_from_activations(base_cache["blocks.1.hook_resid_post"], generator=generator)

model.add_codebook(z_codebook)
model.add_codebook(resid_codebook)
for name, cb in model.codebooks.items():
    print(f"{name}: {cb.cfg.n_groups} group(s) x {cb.cfg.num_codes} codes, k={cb.cfg.k}")

# %% [markdown]
# A wrong hook name is refused with the closest valid names, before anything changes:

# %%
try:
    model.add_codebook(
        Codebook(CodebookConfig(d_in=64, num_codes=8, hook_name="blocks.1.hook_resid_pots"))
    )
except ValueError as err:
    print(type(err).__name__, "-", err)

# %% [markdown]
# ## What `run_with_cache` now records
#
# Each codebook brings three hook points of its own, named after its site:
#
# | name | shape | what |
# |---|---|---|
# | `{site}.hook_codebook_in` | the site's shape | the activation the model produced |
# | `{site}.hook_codes` | `[batch, pos, n_groups, k]` | the chosen code ids, best first |
# | `{site}.hook_codebook_out` | the site's shape | the mean of the chosen codes |
#
# The site's own name (`blocks.0.attn.hook_z`) now holds what flows on through the model: the
# codebook's output.

# %%
with torch.no_grad():
    logits, cache = model.run_with_cache(tokens)

for site in model.codebooks:
    for suffix in ("hook_codebook_in", "hook_codes", "hook_codebook_out"):
        value = cache[f"{site}.{suffix}"]
        print(f"{site}.{suffix:18s} {str(tuple(value.shape)):18s} {value.dtype}")

site = "blocks.0.attn.hook_z"
print("\nfirst token, codes of each head:", cache[f"{site}.hook_codes"][0, 0].tolist())

# %% [markdown]
# These cached values hang together the way the definition says. `encode` on the cached input
# gives the cached codes; `decode` of the codes gives the cached output; and the site's own name
# sees the output:

# %%
for name, cb in model.codebooks.items():
    x = cache[f"{name}.hook_codebook_in"]
    ids = cache[f"{name}.hook_codes"]
    out = cache[f"{name}.hook_codebook_out"]
    assert torch.equal(cb.encode(x), ids)
    assert torch.allclose(cb.decode(ids), out.reshape(*out.shape[:2], -1), atol=1e-6)
    assert torch.equal(cache[name], out)
    relative_error = ((out - x).norm() / x.norm()).item()
    print(f"{name}: relative reconstruction error {relative_error:.3f}")
print("encode(input) == codes, decode(codes) == output, site name == output: checked")

# %% [markdown]
# The per-head codebook's input is what the base model computes at that site (no codebook sits
# before it), while the residual codebook's input already includes the effect of the attention
# codebook upstream, so it differs from the base model's residual stream:

# %%
assert torch.equal(
    cache["blocks.0.attn.hook_z.hook_codebook_in"], base_cache["blocks.0.attn.hook_z"]
)
drift = (
    cache["blocks.1.hook_resid_post.hook_codebook_in"] - base_cache["blocks.1.hook_resid_post"]
).norm() / base_cache["blocks.1.hook_resid_post"].norm()
print(f"residual input vs the base model's residual stream: relative difference {drift:.3f}")

# %% [markdown]
# Code usage is a quick health check of a codebook: how many codes are used, and how evenly.
# Each codebook also counts its hits as it runs (`code_hits`, `dead_codes`), reset with
# `reset_stats()`. Here is the usage of each head's codes on our batch, from the cache.

# %%
z_ids = cache["blocks.0.attn.hook_z.hook_codes"]  # [batch, pos, head, k]
usage = torch.stack(
    [torch.bincount(z_ids[:, :, h].flatten(), minlength=64) for h in range(cfg.n_heads)]
)
fig, ax = plt.subplots(figsize=(8, 2.8))
image = ax.imshow(usage.numpy(), aspect="auto", cmap="viridis")
ax.set_xlabel("code id")
ax.set_ylabel("head (codebook group)")
ax.set_yticks(range(cfg.n_heads))
ax.set_title("blocks.0.attn.hook_z: how often each head's codes are chosen")
fig.colorbar(image, ax=ax, label="tokens x k")
fig.tight_layout()
figure = OUT / "code_usage_per_head.png"
fig.savefig(figure, dpi=100)
plt.close(fig)
print("saved", figure)
used = (usage > 0).sum(1).tolist()
print("codes used per head:", used, "of 64")

# %% [markdown]
# ## Hooks on the site's name still work
#
# Because the codebook replaced the hook point at its site, a hook you put on
# `blocks.0.attn.hook_z` runs on the codebook's output, just before it flows into the attention
# output projection. TransformerLens idioms work unchanged: here we zero head 1 in place.

# %%
seen = {}


def zero_head_1(z, hook):
    seen["z"] = z.clone()
    z[:, :, 1] = 0.0
    return z


with torch.no_grad():
    ablated_logits = model.run_with_hooks(tokens, fwd_hooks=[(site, zero_head_1)])
assert torch.equal(seen["z"], cache[f"{site}.hook_codebook_out"])
assert not torch.allclose(ablated_logits, logits)
print("the hook saw the codebook's output; zeroing head 1 moved the logits by", end=" ")
print(f"{(ablated_logits - logits).abs().max():.3f} (max abs)")

# %% [markdown]
# The codes are a hook point too, so you can edit *which* codes are active. This hook turns
# head 0's first code into code 0 everywhere; `model.force_codes(...)` (tutorial 04) is a tidier
# way to do the same, with positions.

# %%


def head_0_uses_code_0(ids, hook):
    ids = ids.clone()
    ids[:, :, 0, 0] = 0
    return ids


with torch.no_grad():
    with model.hooks(fwd_hooks=[(f"{site}.hook_codes", head_0_uses_code_0)]):
        _, edited = model.run_with_cache(tokens, names_filter=lambda name: name.startswith(site))
assert bool((edited[f"{site}.hook_codes"][:, :, 0, 0] == 0).all())
expected = z_codebook.decode(edited[f"{site}.hook_codes"])
assert torch.allclose(expected, edited[f"{site}.hook_codebook_out"].flatten(-2), atol=1e-6)
print("after the edit, head 0's output is decode(edited codes): checked")

# %% [markdown]
# ## `codebooks_disabled()`: the base model, exactly
#
# Inside `with model.codebooks_disabled():` every codebook (or the ones you name) passes its
# input through untouched, so the logits are the base model's, bit for bit. This is the baseline
# for every comparison: same object, same weights, no bottleneck. Disabling one codebook leaves
# the other in place.

# %%
with torch.no_grad(), model.codebooks_disabled():
    disabled_logits = model(tokens)
assert torch.equal(disabled_logits, base_logits)
print("codebooks disabled: logits equal the base model's exactly")

with torch.no_grad(), model.codebooks_disabled(["blocks.1.hook_resid_post"]):
    _, partial_cache = model.run_with_cache(tokens)
assert "blocks.0.attn.hook_z.hook_codes" in partial_cache
assert "blocks.1.hook_resid_post.hook_codes" not in partial_cache
print("with only the residual codebook disabled, only the attention codes are cached")

print(
    "with codebooks, the logits move from the base model's by "
    f"{(logits - base_logits).abs().mean():.3f} on average (untrained codes: tutorial 02 trains them)"
)

# %% [markdown]
# ## Saving and loading
#
# `save_codebooks` writes a directory with the codebooks' configs (`codebooks.json`) and their
# codes (`codebooks.safetensors`); no pickle, so loading runs no code. The model's own weights
# are only saved when it was jointly fine-tuned (tutorial 03), or if you ask. `load_codebooks`
# puts the codebooks back at their sites in any model of the same shape, checking everything
# before it touches the model.

# %%
saved = model.save_codebooks(OUT / "codebooks")
print("saved:", sorted(p.name for p in saved.iterdir()))

fresh = HookedCodebookTransformer(cfg)
fresh.load_state_dict(base_weights)
fresh.eval()
loaded = fresh.load_codebooks(saved)
assert set(loaded) == set(model.codebooks)
for name, cb in model.codebooks.items():
    assert torch.equal(fresh.codebooks[name].codes, cb.codes)
    assert fresh.codebooks[name].cfg == cb.cfg
with torch.no_grad():
    assert torch.equal(fresh(tokens), logits)
print("reloaded codebooks: same codes, same configs, same logits")

# %% [markdown]
# A single codebook saves and loads on its own as well (`cfg.json` + `codebook.safetensors`),
# and works standalone on any tensor of the right width: `cb(x)` snaps, `cb.encode(x)` gives
# ids, `cb.decode(ids)` turns ids back into vectors. `decode` also takes ids you write yourself,
# e.g. to look at what one code stands for.

# %%
resid_codebook.save(OUT / "resid_codebook")
again = Codebook.load(OUT / "resid_codebook")
assert torch.equal(again.codes, resid_codebook.codes) and again.cfg == resid_codebook.cfg

x = base_cache["blocks.1.hook_resid_post"][:2, :5]  # [2, 5, d_model]
ids = again.encode(x)  # [2, 5, 1, k]
print(
    "encode:",
    tuple(x.shape),
    "->",
    tuple(ids.shape),
    "| first token's codes:",
    ids[0, 0, 0].tolist(),
)
assert torch.allclose(again(x), again.decode(ids), atol=1e-6)
one_code = again.decode(torch.tensor([[[7]]]))  # code 7 alone, as a [1, d_model] vector
assert torch.equal(one_code[0], again.codes[0, 7])
print("cb(x) == decode(encode(x)); decode([[7]]) is code 7 itself")

# %% [markdown]
# ## Taking codebooks out
#
# `remove_codebooks()` restores the original hook points; the model is the base model again
# (and any hooks you add later go where they always went).

# %%
removed = model.remove_codebooks()
print("removed:", list(removed))
with torch.no_grad():
    assert torch.equal(model(tokens), base_logits)
assert "blocks.0.attn.hook_z.hook_codes" not in model.hook_dict
print("after removing the codebooks the logits are the base model's again")

# %% [markdown]
# ## Where next
#
# - `02_train_frozen.py`: train codebooks on a frozen model, and measure what they cost.
# - `03_joint_finetuning.py`: the paper's method, fine-tuning the model with codebooks in place.
# - `04_steer_generation.py`: find a code that means something, and switch it on to steer.
