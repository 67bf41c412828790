# %% [markdown]
# # Which heads carry a task? Codes against circuit discovery, on your own model
#
# `tl-codebook circuits` scores seven methods on models whose circuits are known. This tutorial
# does the same from Python for a task you define yourself: all a method needs is a
# `CircuitTask`, that is an attention-only TransformerLens model, clean prompts that do the task,
# one corrupted counterfactual per prompt (same length), a metric computed from the logits, and,
# if you know it, the true circuit.
#
# The model here is the induction model that ships with the package (2 layers, 4 heads each,
# trained on repeated random tokens mixed with another task). The task is ours, not the
# package's: predict the **last** token of a repeated sequence, measured as a logit
# difference between the right token and the token the corrupted prompt ends with.

# %%
import os
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # write PNGs; no display needed
import torch

from tl_codebook.circuit_tasks.induction import (
    D_VOCAB,
    FIRST_CONTENT_TOKEN,
    load_induction_model,
)
from tl_codebook.comparisons.circuits import CircuitTask, compare_methods
from tl_codebook.comparisons.circuits.report import plot_faithfulness

SIZE = os.environ.get("TL_CODEBOOK_EXAMPLE_SIZE", "full")
assert SIZE in ("toy", "full"), SIZE
OUT = Path(os.environ.get("TL_CODEBOOK_EXAMPLE_OUT", "runs/examples")) / "08_circuits"
OUT.mkdir(parents=True, exist_ok=True)
N_PROMPTS = 8 if SIZE == "toy" else 40
STARTED = time.perf_counter()

# %% [markdown]
# ## 1. A task of your own
#
# A clean prompt is BOS, ten random tokens, then the same ten again minus the last one: the
# model should answer with the tenth token. Its corrupted twin has a fresh second half, so
# nothing repeats. The metric reads the last position only and must stay differentiable (the
# attribution methods take its gradient).

# %%
model = load_induction_model(0)
generator = torch.Generator().manual_seed(7)
half = 10
first = (
    torch.stack(
        [
            torch.randperm(D_VOCAB - FIRST_CONTENT_TOKEN, generator=generator)[:half]
            for _ in range(N_PROMPTS)
        ]
    )
    + FIRST_CONTENT_TOKEN
)
fresh = (
    torch.stack(
        [
            torch.randperm(D_VOCAB - FIRST_CONTENT_TOKEN, generator=generator)[:half]
            for _ in range(N_PROMPTS)
        ]
    )
    + FIRST_CONTENT_TOKEN
)
bos = torch.zeros(N_PROMPTS, 1, dtype=torch.long)
clean = torch.cat([bos, first, first[:, :-1]], dim=1)
corrupted = torch.cat([bos, first, fresh[:, :-1]], dim=1)
answer, foil = first[:, -1], fresh[:, -1]


def last_token_logit_difference(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Per prompt: logit of the right last token minus that of the corrupted prompt's one."""
    last = logits[:, -1]
    rows = torch.arange(last.shape[0])
    return last[rows, answer[: last.shape[0]]] - last[rows, foil[: last.shape[0]]]


with torch.no_grad():
    on_clean = last_token_logit_difference(model(clean), clean).mean()
    on_corrupted = last_token_logit_difference(model(corrupted), corrupted).mean()
print(f"logit difference: clean {on_clean:.2f}, corrupted {on_corrupted:.2f}")
assert on_clean > on_corrupted + 2.0  # the model does the task, and the corruption undoes it

# %% [markdown]
# ## 2. Every method, no ground truth given
#
# Without a true circuit there is no AUROC, but every method still ranks the heads, and MIB's
# faithfulness says how much of the metric the top-ranked heads alone keep (CPR: higher is
# better). `compare_methods` builds one shared graph per ablation and runs each method on it.

# %%
task = CircuitTask("last_token", model, clean, corrupted, last_token_logit_difference)
results = compare_methods(task)
print(f"{'method':22s} {'top heads':28s} {'CPR':>6s} {'seconds':>8s}")
for result in results:
    nodes = result.scores.nodes
    top = sorted(nodes, key=nodes.__getitem__, reverse=True)[:3]
    row = result.row()
    print(f"{result.method:22s} {', '.join(top):28s} {row['cpr']:6.3f} {row['seconds']:8.3f}")
    assert row["node_auroc"] is None  # no truth, no AUROC
exact = next(r for r in results if r.method == "activation_patching").scores.nodes
assert max(exact, key=exact.__getitem__).startswith("L1")  # an induction head matters most

# %% [markdown]
# ## 3. With the truth
#
# The shipped induction task fixes its circuit from attention patterns alone (previous-token and
# induction scores on its own repeated prompts). The same heads should carry our last-token
# task, so handing them (and their edges) to it turns on node AUROC and precision at the
# circuit's size. The codes method compares each head's code histogram on clean and corrupted
# prompts: it can rank highly a head that merely *reacts* to repeats, and it cannot see the
# previous-token head, whose output looks the same whether or not the sequence repeats.

# %%
from tl_codebook.circuit_tasks.induction import induction_task  # noqa: E402

shipped = induction_task(0, model=model)  # the truth it fixed from attention patterns
true_nodes, true_edges = shipped.true_nodes, shipped.true_edges
task = CircuitTask(
    "last_token", model, clean, corrupted, last_token_logit_difference,
    true_nodes=true_nodes, true_edges=true_edges,
)  # fmt: skip
results = compare_methods(task)
for result in results:
    print(f"{result.method:22s} node AUROC {result.node_auroc:.2f}  edge AUROC "
          f"{'-' if result.edge_auroc is None else f'{result.edge_auroc:.2f}'}")  # fmt: skip
patching = next(r for r in results if r.method == "activation_patching")
assert patching.node_auroc is not None and patching.node_auroc >= 0.75
plot_faithfulness(results, OUT / "faithfulness.png")
print(f"true heads {sorted(true_nodes)}; figure {OUT / 'faithfulness.png'}")
print(f"done in {time.perf_counter() - STARTED:.0f} s")
