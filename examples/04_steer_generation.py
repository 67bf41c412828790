# %% [markdown]
# # Steering generation with codes
#
# Codes are discrete and sparse, so some of them come to stand for one thing. If a code stands
# for a concept, switching it on should make the model act as if the concept held. The
# codebook-features paper tests this on TokFSM, where the concepts are known exactly: the model
# must track which state of a finite state machine a walk is in, and the next state it writes
# must be a successor of the current one. Force the code of another state s′, and the model
# should continue from s′ instead.
#
# This tutorial
#
# 1. trains a TokFSM model and fine-tunes it with codebooks (as in tutorial 03, compressed);
# 2. finds, for every state, the code that fires on it, scored by precision and recall
#    (`state_code_scores`), and finds one state's codes again with `CodeCache.search`;
# 3. forces a state's codes during `model.generate` with `model.force_codes(..., positions=...)`;
# 4. measures how often the generation follows the forced state, against no intervention and
#    random codes in the same places (`evaluate_interventions`), and plots it.
#
# On a language model the recipe is the same: search a code cache for a concept (a regex over
# the text, a token set, any position mask), then force the codes you found while generating.

# %%
import os
import time
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from tl_codebook.analysis import CodeCache
from tl_codebook.fsm import (
    FSM,
    ExperimentConfig,
    TokFSMDataset,
    TokFSMTask,
    determined_states,
    evaluate_interventions,
    next_token_loss,
    state_code_scores,
    steering_codes,
    summarize_state_codes,
)
from tl_codebook.fsm.models import build_base_model, train_base_model
from tl_codebook.training import TrainConfig, train_codebooks

warnings.filterwarnings("ignore", message="HookedTransformer is deprecated")  # TL 3.9 notice
SIZE = os.environ.get("TL_CODEBOOK_EXAMPLE_SIZE", "full")
OUT = Path(os.environ.get("TL_CODEBOOK_EXAMPLE_OUT", "runs/examples")) / "04_steer_generation"
OUT.mkdir(parents=True, exist_ok=True)
torch.manual_seed(0)
started = time.perf_counter()

# %% [markdown]
# ## A codebook model of TokFSM
#
# First a base model (plain next-token training), then joint fine-tuning with a codebook at
# every attention head and MLP output, k = 1 (tutorial 03 explains each setting).

# %%
if SIZE == "toy":
    shape = dict(n_states=6, n_edges=2, base=3)
    shape.update(seq_len=16, n_layers=1, d_model=32, n_heads=2, d_mlp=64)
    base_steps, joint_steps, batch_size, num_codes = 300, 60, 32, 24
    n_held_out, n_prompts = 64, 48
else:
    shape = dict(n_states=32, n_edges=4, base=10)
    shape.update(seq_len=32, n_layers=2, d_model=64, n_heads=4, d_mlp=256)
    base_steps, joint_steps, batch_size, num_codes = 600, 300, 64, 128
    n_held_out, n_prompts = 512, 400

# The demo's TokFSM model family and base-model training (rotary, LayerNorm, GELU; AdamW with
# weight decay 0.1, lr 3e-3, warm-up then cosine decay), so this tutorial can spend its time
# on the codes.
config = ExperimentConfig(
    **shape, base_steps=base_steps, base_batch_size=batch_size, progress=False
)
seq_len = config.seq_len
fsm = FSM.generate(config.fsm_config())
held_out = TokFSMDataset(fsm, seq_len=seq_len, seed=0).held_out(n_held_out)
model = build_base_model(config, fsm, "cpu")
train_base_model(config, model, TokFSMDataset(fsm, seq_len=seq_len, seed=0).batches(batch_size))
common = dict(batch_size=batch_size, model_weight_decay=0.1, log_every=10, seed=0, progress=False)
base_loss = next_token_loss(model, held_out)
train_codebooks(
    model,
    TokFSMDataset(fsm, seq_len=seq_len, seed=1).batches(batch_size),
    TrainConfig(
        mode="joint",
        sites=["attn.hook_z:group", "hook_mlp_out"],
        num_codes=num_codes,
        k=1,
        steps=joint_steps,
        lr=1e-3,
        model_lr_factor=0.1,
        warmup_steps=joint_steps // 10,
        codebook_init="kmeans",
        exclude_token_ids=[fsm.bos_token],
        **common,
    ),
)
codebook_loss = next_token_loss(model, held_out)
print(f"{fsm}: held-out loss base {base_loss:.4f}, codebook model {codebook_loss:.4f}")
print(
    "codebooks:", ", ".join(f"{n} ({cb.cfg.n_groups} groups)" for n, cb in model.codebooks.items())
)

# %% [markdown]
# ## Which code means "the walk is in state s"?
#
# A state is known once its last digit has been read. `determined_states` labels each position
# with the state whose last digit sits there (-1 elsewhere). A code is a good name for state s
# when it fires where the state is s (**recall**) and hardly anywhere else (**precision**).
# `state_code_scores` runs the model once over the held-out walks, collects every codebook's
# codes and scores every (codebook, group, code) against every state with the project's one
# precision/recall counter (`tl_codebook.analysis.concepts`). It returns one table per digit of
# a state: entry 0 is "state s was just completed"; entry j the position j digits into the
# next state, labelled by (s, the digits written so far), which steering needs while the next
# state is being written.

# %%
phase_scores = state_code_scores(model, fsm, held_out)
summary = summarize_state_codes(phase_scores[0], fsm.n_states, threshold=0.9)
print(
    f"{summary['states_with_precise_code']:.0%} of states have a code with precision and "
    "recall >= 0.9 somewhere in the model"
)
for site, row in summary["per_site"].items():
    print(
        f"  {site:24s} {row['states_with_precise_code']:6.0%} of states, mean best F1 {row['mean_best_f1']:.2f}"
    )

state = 3
best = summary["best_per_state"][state]
print(
    f"state {state}: best code {best['code']} of group {best['group']} at {best['site']} "
    f"(precision {best['precision']:.2f}, recall {best['recall']:.2f})"
)

# %% [markdown]
# ### The same question through a code cache
#
# `CodeCache` stores every codebook's code ids over a corpus once (memory-mapped, with an inverted
# index), and `search` ranks codes by F1 against any set of positions: token ids, a regex over
# the decoded text, or a boolean mask. Here the mask is "state 3 was just completed".
#
# The search and the table above count alike, with one difference in what they count against.
# The table only looks at positions where *some* state was just completed (it asks "which
# state is this?"); the search looks at every position (it asks "where does this code fire?").
# So a code's recall is the same in both, and its precision in the search can only be lower: a
# code may also fire in the middle of a state's digits.

# %%
cache = CodeCache.build(
    model,
    held_out,
    OUT / "code_cache",
    vocab=[str(i) for i in range(fsm.base)] + ["BOS"],
    progress=False,
)
mask = determined_states(fsm, held_out) == state
matches = cache.search(mask=mask, top=5)
for m in matches:
    table = phase_scores[0][m.hook]
    print(
        f"  {m.hook:24s} group {m.group} code {m.code:4d}: recall {m.recall:.2f}, precision "
        f"{m.precision:.2f} over all positions, {table.precision[m.group, m.code, state]:.2f} "
        "over state ends"
    )
    assert abs(m.recall - float(table.recall[m.group, m.code, state])) < 1e-6
    assert m.precision <= float(table.precision[m.group, m.code, state]) + 1e-6
print("same recall in both; the search's precision never exceeds the table's")

# %% [markdown]
# ## Forcing codes by hand
#
# A steering experiment: a prompt that ends in state s, and a target state s′ ≠ s. The TokFSM
# task (`TokFSMTask`) draws such trials: BOS plus a random walk of 3 states, and a random other
# target. `steering_codes` turns the phase-0 table into the codes to force: for every codebook
# group, the code with the best F1 for s′, as `{site: {group: [code]}}`, the form
# `model.force_codes` takes.
#
# `force_codes(spec, positions=...)` rewrites `hook_codes` at those positions, so the model
# computes as if those codes had been chosen. Positions are absolute in the whole sequence;
# here the prompt's last token, where the model has just read the state it is in.

# %%
task = TokFSMTask(fsm, seq_len)
trials = task.steering_trials(8, seed=0)
phase0 = phase_scores[0]
prompt, source, target = trials.prompts[:1], int(trials.sources[0]), int(trials.targets[0])
spec = steering_codes(phase0, target)
last = prompt.shape[1] - 1
print(f"prompt {prompt[0].tolist()} ends in state {source}; steer to state {target}")
print("codes forced:", {site: groups for site, groups in spec.items()})

with model.force_codes(spec, positions=[last]):
    _, forced_cache = model.run_with_cache(prompt)
for site, groups in spec.items():
    for group, codes in groups.items():
        assert forced_cache[f"{site}.hook_codes"][0, last, group, 0].item() == codes[0]
print("inside force_codes, hook_codes at the last position hold exactly the forced codes")

# %% [markdown]
# Now generate the next state's digits greedily, with and without the intervention, for the
# first few trials. `force_codes` works through `generate` (with or without the KV cache): a
# forced position keeps its codes however the tokens are fed in.


# %%
def successors(s):
    return fsm.transitions[s].tolist()


d = fsm.digits_per_state
for i in range(len(trials.prompts)):
    prompt = trials.prompts[i : i + 1]
    source, target = int(trials.sources[i]), int(trials.targets[i])
    plain = model.generate(
        prompt, max_new_tokens=d, do_sample=False, verbose=False, stop_at_eos=False
    )
    with model.force_codes(steering_codes(phase0, target), positions=[prompt.shape[1] - 1]):
        steered = model.generate(
            prompt, max_new_tokens=d, do_sample=False, verbose=False, stop_at_eos=False
        )
    plain_state = int(fsm.tokens_to_states(plain)[0, -1])
    steered_state = int(fsm.tokens_to_states(steered)[0, -1])
    print(
        f"in {source:2d} (next: {successors(source)}) -> {plain_state:2d} | forced {target:2d} "
        f"(next: {successors(target)}) -> {steered_state:2d} "
        f"{'follows the forced state' if steered_state in successors(target) else ''}"
    )

# %% [markdown]
# Forcing one position steers the first digit the model writes; when a state has several
# digits, the model reads its own first digit again before writing the second, and that
# position still carries the real state. The measurement below therefore forces codes at every
# position until the next state is written: at the prompt's last token the codes for "state
# s′", after the first generated digit the codes for "s′, then that digit" (the phase-1 table).
#
# ## Measuring steering
#
# `evaluate_interventions` runs the TokFSM steering measure (the same one the demo and the
# SAE comparison report) over many trials and five conditions, sampling at temperature 1:
#
# - `none`: no intervention;
# - `steer`: s′'s codes in every codebook group at every position until the next state is
#   written (as just described);
# - `steer_best_site`: only the single (site, group) whose code for s′ has the best F1;
# - `steer_last_position`: every group, but only at the prompt's last token;
# - `random_code`: a random other code in each of `steer`'s slots and positions.
#
# Success means the generated state is a successor of s′. Some of s's successors are also
# successors of s′, so even `none` succeeds now and then (`chance_overlap`).

# %%
results = evaluate_interventions(
    model, fsm, phase_scores, n_prompts=n_prompts, seed=2, progress=False
)
conditions = ["none", "steer", "steer_best_site", "steer_last_position", "random_code"]
print(f"{n_prompts} trials; chance overlap of successor sets {results['chance_overlap']:.2f}")
print(f"{'condition':22s} {'follows s′':>10s} {'follows s':>10s}")
for c in conditions:
    print(f"{c:22s} {results[c]['success']:10.2f} {results[c]['follows_source']:10.2f}")

for c in conditions:
    assert 0.0 <= results[c]["success"] <= 1.0
if SIZE == "full":
    assert results["steer"]["success"] > results["random_code"]["success"] + 0.3, results
    assert results["steer"]["success"] > results["none"]["success"] + 0.3, results

# %%
fig, ax = plt.subplots(figsize=(8, 4))
x = torch.arange(len(conditions)).float()
ax.bar(
    x - 0.2,
    [results[c]["success"] for c in conditions],
    0.4,
    label="next state follows s′ (target)",
)
ax.bar(
    x + 0.2,
    [results[c]["follows_source"] for c in conditions],
    0.4,
    label="next state follows s (prompt)",
)
ax.axhline(results["chance_overlap"], color="grey", linestyle=":", label="chance overlap")
ax.set_xticks(x.tolist(), [c.replace("_", "\n") for c in conditions])
ax.set_ylabel("fraction of trials")
ax.set_ylim(0, 1.05)
ax.set_title(f"Steering TokFSM by forcing state codes ({n_prompts} trials, temperature 1)")
ax.legend(fontsize=8)
ax.grid(axis="y", alpha=0.3)
fig.tight_layout()
figure = OUT / "steering.png"
fig.savefig(figure, dpi=100)
plt.close(fig)
print("saved", figure)
print(f"total time {time.perf_counter() - started:.0f}s")

# %% [markdown]
# Forcing the state's codes everywhere the state matters moves the model to the target state;
# random codes in the same places do not, so it is the codes' meaning, not the disruption, that
# steers. One codebook group or one position alone steers only part of the time: the model keeps
# the state in many places at once (every head and MLP of every layer), and reads it again at
# each digit it writes.
