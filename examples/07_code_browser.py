# %% [markdown]
# # Finding what codes mean: the code cache, search and the code browser
#
# A codebook turns a hidden state into a few discrete code ids, so "what does the model represent
# here?" becomes a question about integers. Integers can be counted, indexed and searched like
# words in a document collection. The analysis workflow is:
#
# 1. run the model once over a corpus and store every token's code ids: a `CodeCache`;
# 2. ask which codes fire where something holds: `cache.search(tokens=...)`, `regex=...` or
#    `mask=...`, ranked by F1 (precision = P(thing | code), recall = P(code | thing));
# 3. look at where a code fires: `cache.top_contexts`;
# 4. browse everything in an offline code browser: `write_dashboard`.
#
# We do it on TokFSM, the paper's synthetic task, because it has ground truth: each sequence is
# a walk through a random finite state machine, written as digits, and the model must track the
# hidden state to predict the next digit. If codes are interpretable, some of them should fire
# exactly when the walk is in a given state. Everything runs offline on a CPU;
# `TL_CODEBOOK_EXAMPLE_SIZE=toy` is a seconds-long smoke run whose numbers mean nothing.

# %%
import os
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # write PNGs; no display needed
import matplotlib.pyplot as plt
import numpy as np
import torch

from tl_codebook.analysis import CodeCache, write_dashboard
from tl_codebook.analysis.contexts import density_histogram
from tl_codebook.analysis.plots import plot_precision_recall_bars
from tl_codebook.fsm import TokFSMDataset
from tl_codebook.fsm.experiment import tokfsm_vocab
from tl_codebook.fsm.task import TokFSMModelConfig, train_tokfsm_model
from tl_codebook.training import TrainConfig, train_codebooks

SIZE = os.environ.get("TL_CODEBOOK_EXAMPLE_SIZE", "full")
assert SIZE in ("toy", "full"), SIZE
OUT = Path(os.environ.get("TL_CODEBOOK_EXAMPLE_OUT", "runs/examples")) / "07_code_browser"
OUT.mkdir(parents=True, exist_ok=True)
torch.manual_seed(0)
np.random.seed(0)
STARTED = time.perf_counter()

if SIZE == "full":
    MODEL = TokFSMModelConfig(steps=400)  # 2 layers, d_model 64, 4 heads, a 32-state FSM
    NUM_CODES, CODEBOOK_STEPS, BATCH, CORPUS = 128, 200, 64, 512
else:
    MODEL = TokFSMModelConfig(n_layers=1, d_model=32, n_heads=2, d_mlp=64, steps=30, batch_size=32)
    NUM_CODES, CODEBOOK_STEPS, BATCH, CORPUS = 32, 10, 32, 32
print(f"size={SIZE}; outputs under {OUT}")

# %% [markdown]
# ## 1. A model with codebooks
#
# First a small transformer trained on TokFSM (`train_tokfsm_model`, the default model of
# `tl-codebook compare`), returned with its `TokFSMTask`: the data and the state labels.
#
# Then codebooks go in, as in the paper: one at every layer's MLP output, and one per attention
# head at every layer's `attn.hook_z` (the `:group` site spec gives one group per head), each with
# k = 1, so every hidden state there is replaced by a single code vector. The model is fine-tuned
# **jointly** with its codebooks on the language-model loss (its own weights at a tenth of the
# codebooks' learning rate), starting from codes placed at k-means centres of its activations.

# %%
model, task = train_tokfsm_model(MODEL, OUT / "model", progress=False)
fsm = task.fsm
BOS = fsm.bos_token
print(task, f"- {fsm.digits_per_state} digits per state, BOS = {BOS}")

result = train_codebooks(
    model,
    TokFSMDataset(fsm, seq_len=task.seq_len, seed=1).batches(BATCH),
    TrainConfig(
        mode="joint",
        sites=["hook_mlp_out", "attn.hook_z:group"],
        num_codes=NUM_CODES,
        k=1,
        steps=CODEBOOK_STEPS,
        batch_size=BATCH,
        lr=1e-3,
        model_lr_factor=0.1,
        warmup_steps=max(1, CODEBOOK_STEPS // 10),
        schedule="cosine",
        min_lr_fraction=0.1,
        codebook_init="kmeans",
        init_batches=8,
        exclude_token_ids=[BOS],
        seed=0,
        progress=False,
        log_every=max(1, CODEBOOK_STEPS // 5),
    ),
)
model.eval()
for name, codebook in model.codebooks.items():
    print(f"{name:>24}: {codebook.cfg.n_groups} group(s) x {codebook.cfg.num_codes} codes")
print(f"next-token loss with codebooks after {result.steps} steps: {result.final_loss:.3f}")

# %% [markdown]
# ## 2. The code cache
#
# `CodeCache.build` runs the model once over the corpus (here held-out sequences, never trained
# on) and writes every codebook's code ids to disk: plain `.npy` arrays in the smallest integer
# type that holds them (uint16 here: 2 bytes per token per head), plus an inverted index from
# each code to the positions where it fires, so a per-code query costs O(firings), not
# O(tokens). `vocab` gives each token id a string, which the browser shows and a regex search
# reads. The cache reopens memory-mapped (`CodeCache.open`), without the model.
#
# The cached ids are the ones TransformerLens sees at `{site}.hook_codes` in `run_with_cache`:
# we check that on a few sequences.

# %%
corpus = task.tokens(CORPUS, "eval", seed=0)
cache = CodeCache.build(model, corpus, OUT / "cache", vocab=tokfsm_vocab(fsm), progress=False)
print(cache)
HOOK = "blocks.0.attn.hook_z"
with torch.no_grad():
    _, tl_cache = model.run_with_cache(corpus[:8])
for hook in cache.hooks:
    assert np.array_equal(cache.codes(hook)[:8], tl_cache[f"{hook}.hook_codes"].numpy()), hook
print(
    f"codes at {HOOK}: shape {cache.codes(HOOK).shape} (seq, pos, heads, k), "
    f"dtype {cache.codes(HOOK).dtype}; equal to run_with_cache's hook_codes"
)

# %% [markdown]
# ## 3. Searching by token
#
# `cache.search(tokens=[...])` labels every position holding one of the given token ids and
# ranks all codes of all codebooks by F1 against those positions. With `count` the code's
# firings over the whole cache and `true_positives` those on labelled positions,
# precision = true_positives / count and recall = true_positives / (labelled positions).
#
# Which codes fire on the digit 7? We recompute the best match's precision and recall by hand
# from the cached ids, as a check.

# %%
DIGIT = 7 % fsm.base
matches = cache.search(tokens=[DIGIT], top=5)
for m in matches:
    print(
        f"{m.hook:>24} head/group {m.group} code {m.code:>3}: precision {m.precision:.3f} "
        f"recall {m.recall:.3f} F1 {m.f1:.3f} (fires {m.count} times)"
    )
best = matches[0]
fires = (cache.codes(best.hook)[:, :, best.group, :] == best.code).any(-1)
labelled = np.asarray(cache.tokens) == DIGIT
assert fires.sum() == best.count and (fires & labelled).sum() == best.true_positives
assert np.isclose(best.precision, (fires & labelled).sum() / fires.sum())
assert np.isclose(best.recall, (fires & labelled).sum() / labelled.sum())

# %% [markdown]
# Searching for a token mostly finds codes that copy the current token, which is not very deep.
# `regex=` searches the decoded text instead: `cache.search(regex=r"7(?=3)")` finds codes for
# "a 7 followed by a 3". The real power is `mask=`: any boolean array over the corpus's
# positions, such as a concept that no token spells out.

# %% [markdown]
# ## 4. Searching for a concept: the FSM's hidden state
#
# `task.concept_labels` gives, for each position, the state whose last digit is read there (-1
# elsewhere). The mask `labels == s` marks "the walk has just entered state s"; a code with high
# precision and recall against it is a code for state s. We look at one state in detail, then
# take the best code for every state.

# %%
labels = task.concept_labels(torch.from_numpy(np.asarray(cache.tokens, dtype=np.int64))).numpy()
STATE = int(np.bincount(labels[labels >= 0]).argmax())  # the most frequent state in the corpus
for m in cache.search(mask=labels == STATE, top=3):
    print(
        f"state {STATE}: {m.hook:>24} group {m.group} code {m.code:>3} precision "
        f"{m.precision:.3f} recall {m.recall:.3f}"
    )

best_per_state = []
for state in range(fsm.n_states):
    found = cache.search(mask=labels == state, top=1)
    best_per_state.append(found[0] if found else None)
precision = [m.precision if m else 0.0 for m in best_per_state]
recall = [m.recall if m else 0.0 for m in best_per_state]
precise = np.mean([p >= 0.9 and r >= 0.9 for p, r in zip(precision, recall)])
print(f"states with a code of precision >= 0.9 and recall >= 0.9: {precise:.3f}")
if SIZE == "full":
    assert precise >= 0.4, precise

figure = plot_precision_recall_bars(
    task.concept_names,
    precision,
    recall,
    OUT / "state_codes.png",
    threshold=0.9,
    title="Best code for each FSM state (over every codebook)",
    xlabel="FSM state",
)
print(f"figure: {figure}")

# %% [markdown]
# ## 5. Where a code fires: `top_contexts`
#
# `cache.top_contexts(hook, code, group=...)` returns windows of tokens around the code's
# firings (best similarity first when the cache stores scores, else in corpus order). For the
# best code of our state, each window should end in the state's digits. TokFSM states are
# written with `digits_per_state` digits, so we print the decoded window with the firing token
# in brackets and the state that was just completed.

# %%
code = cache.search(mask=labels == STATE, top=1)[0]
print(f"state {STATE} is written {fsm.state_to_tokens(STATE)}")
for context in cache.top_contexts(code.hook, code.code, group=code.group, n=6, window=6):
    text = " ".join(
        f"[{cache.vocab[t]}]" if i == context.center else cache.vocab[t]
        for i, t in enumerate(context.token_ids)
    )
    state_here = int(labels[context.seq, context.pos])
    print(f"seq {context.seq:>3} pos {context.pos:>2}: {text:<48} state here: {state_here}")

# %% [markdown]
# How often do codes fire at all? `cache.code_density(hook)` is each code's firing frequency;
# a healthy codebook uses most of its codes, and `density_histogram` bins them on a log scale as
# SAE dashboards do (dead codes are counted apart).

# %%
fig, ax = plt.subplots(figsize=(6.5, 4))
for hook in cache.hooks:
    hist = density_histogram(cache.code_density(hook), bins=20)
    if hist.edges:
        ax.stairs(hist.counts, hist.edges, label=f"{hook} ({hist.dead} dead)")
ax.set_xlabel("log10 firing frequency (fraction of cached tokens)")
ax.set_ylabel("codes (all groups)")
ax.set_title("Code firing frequency on the corpus")
ax.legend(fontsize=7)
fig.tight_layout()
fig.savefig(OUT / "code_density.png", dpi=110)
plt.close(fig)
print(f"figure: {OUT / 'code_density.png'}")

# %% [markdown]
# ## 6. The offline code browser
#
# `write_dashboard` writes a static site from the cache: an index of every codebook (density
# histograms, dead codes), a page per code with its top contexts, co-firing codes, and (with
# `model=`) its logit effects and most similar codes, and a token search. With `labels=` every
# code also gets its best-matching labels: here the FSM states. Open `index.html` straight from
# disk (`file://`); it makes no network request.
#
# The same steps exist on the command line: `tl-codebook cache`, `tl-codebook search` and
# `tl-codebook dashboard`.

# %%
index = write_dashboard(
    cache,
    OUT / "site",
    model=model,
    labels=(torch.from_numpy(labels), task.concept_names),
)
assert index.is_file() and index.name == "index.html"
assert (OUT / "site" / "data" / "index.js").is_file()
print(f"code browser: {index.resolve()}")
print(f"done in {time.perf_counter() - STARTED:.1f} s")
