# %% [markdown]
# # Codebooks and SAEs side by side
#
# Are codebooks better or worse than sparse autoencoders? The only fair way to ask is to train
# them on the **same activations**, with the **same budget**, and to score them with the **same
# code**. `tl_codebook.comparisons` does exactly that:
#
# - an `ActivationStore` caches a model's activations at one hook once, on disk, in SAELens'
#   cached-activations layout, so every method trains on the very same tensors in the very same
#   batch order;
# - every method gets the same number of training tokens: our codebook trainer, the same codebook
#   trained by SAELens' own `SAETrainer` (through the registered `"codebook"` architecture), and
#   SAELens' TopK and BatchTopK SAEs;
# - every method is scored by one function with SAELens' own metric definitions (a test checks
#   they equal `sae_lens.evals.run_evals` on the same SAE and tokens), plus what a task with
#   ground truth adds: does a single latent capture a known concept, and can it steer the model?
#
# The task here is TokFSM, where the concepts are the hidden states of a finite state machine.
# Everything runs offline on a CPU. `TL_CODEBOOK_EXAMPLE_SIZE=toy` gives a seconds-long smoke
# run whose numbers mean nothing; the default `full` size is the comparison the README reports
# (about 2-3 minutes on two cores).

# %%
import os
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # write PNGs; no display needed
import torch

from tl_codebook.comparisons import (
    ActivationStore,
    ComparisonConfig,
    ComparisonResult,
    EvalConfig,
    MethodSpec,
    TrainingConfig,
    run_comparison,
)
from tl_codebook.comparisons.compare import DEFAULT_METHODS, SUMMARY_COLUMNS
from tl_codebook.comparisons.report import notes
from tl_codebook.fsm.task import TokFSMModelConfig, train_tokfsm_model

SIZE = os.environ.get("TL_CODEBOOK_EXAMPLE_SIZE", "full")
assert SIZE in ("toy", "full"), SIZE
OUT = Path(os.environ.get("TL_CODEBOOK_EXAMPLE_OUT", "runs/examples")) / "06_compare_with_saes"
OUT.mkdir(parents=True, exist_ok=True)
torch.manual_seed(0)
STARTED = time.perf_counter()

if SIZE == "full":  # the defaults of `tl-codebook compare`
    MODEL = TokFSMModelConfig(steps=400)  # 2 layers, d_model 64, a 32-state FSM
    STORE_SEQUENCES, EVAL_SEQUENCES = 4096, 512
    D_SAE, KS, TRAINING_TOKENS, BATCH = 128, (1, 4), 1_048_576, 1024
    INIT_TOKENS, STEERING_PROMPTS = 16384, 256
else:
    MODEL = TokFSMModelConfig(n_layers=1, d_model=32, n_heads=2, d_mlp=64, steps=30, batch_size=32)
    STORE_SEQUENCES, EVAL_SEQUENCES = 128, 32
    D_SAE, KS, TRAINING_TOKENS, BATCH = 32, (1,), 4096, 512
    INIT_TOKENS, STEERING_PROMPTS = 1024, 8
HOOK = "blocks.0.hook_resid_post"
print(f"size={SIZE}; outputs under {OUT}")

# %% [markdown]
# ## 1. The model and its activations
#
# `train_tokfsm_model` trains the small TokFSM transformer that `tl-codebook compare` uses by
# default and returns it with its task: `TokFSMTask` hands out training and held-out token
# sequences, labels every position with the FSM state known there, names BOS as the token no
# metric should count, and defines the steering measure.
#
# `ActivationStore.build` runs the model once over the tokens and writes the activations at
# `HOOK` to disk (Arrow shards that `datasets.load_from_disk` and SAELens' `ActivationsStore`
# read as they are). The store records the model's weight fingerprint, so it cannot silently be
# used with another model, and the task, so the comparison knows its concepts. The evaluation
# store holds held-out sequences that no method trains on.

# %%
model, task = train_tokfsm_model(MODEL, OUT / "model", progress=False)
print(task)
stores = {}
for split, n_seq in (("train", STORE_SEQUENCES), ("eval", EVAL_SEQUENCES)):
    stores[split] = ActivationStore.build(
        model,
        task.tokens(n_seq, split, seed=0),
        [HOOK],
        OUT / "store" / split,
        metadata={"task": task.to_dict()},
        overwrite=True,
        progress=False,
    )
    print(f"{split}: {stores[split]}")

# %% [markdown]
# ## 2. The methods and the budget
#
# A `MethodSpec` names a kind of method and what differs from the shared settings; the
# `TrainingConfig` is the budget every trained method shares: the hook, the width `d_sae`
# (latents for an SAE, codes for a codebook), the tokens seen and the batch size, the learning
# rate and the seed. Each kind is trained once per k:
#
# - `codebook`: our trainer (`train_codebooks_on_activations`) with SAETrainer's settings (Adam,
#   constant learning rate, gradient norm clipped at 1, SAELens' MSE). Codes start as k-means
#   centres of `init_tokens` activations drawn apart from the training stream.
# - `codebook_saelens`: the same codebook from the same initial codes, trained by SAELens'
#   `SAETrainer`: a check that the two trainers agree.
# - `topk`, `batchtopk`: SAELens' TopK SAE (exactly k latents per token) and BatchTopK SAE (k on
#   average over a batch; it runs as a JumpReLU SAE afterwards).
#
# `EvalConfig` sets how all of them are scored (the same for every method).

# %%
methods = [MethodSpec(kind, k=k) for kind in DEFAULT_METHODS for k in KS]
config = ComparisonConfig(
    training=TrainingConfig(
        hook_name=HOOK,
        d_sae=D_SAE,
        training_tokens=TRAINING_TOKENS,
        batch_size=BATCH,
        lr=3e-3,
        seed=0,
        init_tokens=INIT_TOKENS,
        progress=False,
    ),
    evaluation=EvalConfig(steering_prompts=STEERING_PROMPTS, seed=0, progress=False),
    methods=methods,
)
print("methods:", ", ".join(f"{m.kind}:k={m.k}" for m in methods))

# %% [markdown]
# ## 3. Run the comparison
#
# `run_comparison` checks every spec before anything trains, trains each method on the training
# store, evaluates each on the held-out store (splicing it into the model for the loss metrics
# and steering), and, given `out_dir`, saves every method's weights under `methods/` and writes
# a report (`index.html`, `comparison.json`/`.csv`/`.md`, `details.json` and the plots).

# %%
result = run_comparison(
    stores["train"],
    config=config,
    model=model,
    eval_store=stores["eval"],
    task=task,
    out_dir=OUT / "report",
)
print(result.to_markdown(SUMMARY_COLUMNS))
for line in notes(result):
    print("-", line)

# %% [markdown]
# ## 4. What the columns mean
#
# Reconstruction is measured on the stored held-out activations `x` (BOS positions left out of
# every mean), with `x̂ = decode(encode(x))`:
#
# - **`l0`**: latents active (≠ 0) per token. A codebook's is exactly k; a TopK SAE's is at most
#   k (its ReLU can zero a chosen latent); a BatchTopK SAE's is k only on average.
# - **`mse`**: `E‖x − x̂‖²`, summed over dimensions and averaged over tokens (SAELens' `mse`).
# - **`explained_variance`**: `1 − mse / (E‖x‖² − ‖E x‖²)`, the share of the activations'
#   variance the reconstruction keeps (SAELens' R²).
# - **`ce_loss_score`**: the model re-run with `x̂` spliced in at every non-BOS position.
#   `(CE_ablation − CE_sae) / (CE_ablation − CE_clean)`, where the ablation zeroes the activation at
#   every position: 1 means the spliced model predicts as well as the clean one, 0 no better than
#   with the activation deleted.
# - **`kl_div_with_sae`**: the mean over positions of KL(clean ‖ spliced) of the next-token
#   distributions (0 = the spliced model predicts exactly like the clean one).
# - **`dead_fraction`**: latents that never fire on the evaluation tokens.
# - **`concepts_with_precise_latent`**: the task's concepts (here: the 32 FSM states, each
#   labelled where its last digit is read) for which one latent has precision ≥ 0.9 and recall
#   ≥ 0.9: a single latent that fires exactly when the state holds.
# - **`steering_success`**: each state's best latent (highest F1) is forced on at the last
#   position of a prompt that ends in another state, with the method spliced in; success means
#   the model then writes a valid successor of the *target* state. `steering_baseline` is the same
#   splice with nothing forced (how often the continuation fits the target by chance).
# - **`train_tokens`**, **`train_seconds`**, **`tokens_per_second`**: the budget each method used
#   and how fast it trained (the codebooks' k-means start is counted apart, as `init_tokens`).
#
# The columns `fve`, `ce_loss_recovered`, `kl` and `states_with_precise_latent` in
# `comparison.json` repeat `explained_variance`, `ce_loss_score`, `kl_div_with_sae` and
# `concepts_with_precise_latent` for older readers.
#
# A few of these relations are exact, so we check them.

# %%
assert result.matched_budget(), "every trained method saw the same tokens"
for row in result.rows:
    k = result.methods[row["method"]].spec.k
    if row["kind"] in ("codebook", "codebook_saelens"):
        assert row["l0"] == k, row  # exactly k codes per token
    if row["kind"] == "topk":
        assert row["l0"] <= k + 1e-9, row
    score = (row["ce_loss_with_ablation"] - row["ce_loss_with_sae"]) / (
        row["ce_loss_with_ablation"] - row["ce_loss_without_sae"]
    )
    assert abs(score - row["ce_loss_score"]) < 1e-9
    assert row["fve"] == row["explained_variance"] and row["kl"] == row["kl_div_with_sae"]
for agreement in result.agreement:  # our trainer vs SAELens' trainer on the same codebook
    print(
        f"{agreement['ours']} vs {agreement['saelens']}: same codes on "
        f"{agreement['same_codes_fraction']:.1%} of tokens, largest code difference "
        f"{agreement['max_code_difference']:.2g} of the largest code norm"
    )
    if SIZE == "full":
        assert agreement["same_codes_fraction"] > 0.95, agreement
if SIZE == "full":
    codebook_k1 = result.row("codebook-k1")
    assert codebook_k1["explained_variance"] > 0.9 and codebook_k1["ce_loss_score"] > 0.95

# %% [markdown]
# ## 5. Plots
#
# `result.plot()` draws the report's figures in one: explained variance and CE loss score
# against L0 (one line per kind of method; the SAELens-trained codebook is drawn hollow and
# dashed because it sits on top of ours), the latent firing-frequency histograms, each state's
# best-latent precision and recall, and steering success next to its baseline. The report
# directory also holds each panel as its own PNG.

# %%
figure = result.plot()
path = OUT / "comparison.png"
figure.savefig(path, dpi=100)
print(f"figure: {path}")
print(f"report: {OUT / 'report' / 'index.html'}")
print("report figures:", ", ".join(sorted(p.name for p in (OUT / "report").glob("*.png"))))

# %% [markdown]
# ## 6. Reading a saved comparison
#
# The report directory is self-contained: `ComparisonResult.load` reads the rows, per-method
# details and config back (without the trained weights, which sit under `methods/`: codebooks as
# `Codebook.load` directories, SAEs as SAELens `SAE.load_from_disk` directories). To compare your
# own trained SAE or codebook, pass the object itself in `methods` (`run_comparison(store,
# [my_sae, "codebook"], ...)`): trained objects are only evaluated, specs are trained.

# %%
loaded = ComparisonResult.load(OUT / "report")
assert [r["method"] for r in loaded.rows] == [r["method"] for r in result.rows]
assert all(
    a["explained_variance"] == b["explained_variance"] for a, b in zip(loaded.rows, result.rows)
)
print("methods saved:", ", ".join(sorted(p.name for p in (OUT / "report" / "methods").iterdir())))
print(f"done in {time.perf_counter() - STARTED:.1f} s")
