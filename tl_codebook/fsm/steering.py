"""State codes of a TokFSM model and steering through them: which code means "the current state
is s" at each codebook site, and what the model does when those codes are forced in another state.

The paper's claim under test: forcing state s′'s codes makes the model continue as if it were in
s′ (its next state is a successor of s′), while a random code or no intervention does not.
Prompts, targets and the success check are the TokFSM task's steering measure
(`tl_codebook.fsm.task.TokFSMTask`), the same one `tl-codebook compare` scores SAEs with;
generation is the one `tl_codebook.tasks.sample_sequences`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from tl_codebook.analysis.concepts import ConceptScores, code_concept_precision_recall
from tl_codebook.fsm.dataset import determined_states
from tl_codebook.fsm.divergence import intervention_divergence
from tl_codebook.fsm.machine import FSM
from tl_codebook.fsm.task import TokFSMTask
from tl_codebook.hooks.interventions import SteeringSpec, random_codes_like
from tl_codebook.hooks.model import HookedCodebookTransformer
from tl_codebook.tasks import sample_sequences

SpecFor = Callable[[int, int], SteeringSpec | None]
"""(phase, context label) -> the codes to force at that phase's position (None: nothing)."""

CONDITIONS = ("none", "steer", "steer_best_site", "steer_last_position", "random_code")
"""Intervention conditions, see `evaluate_interventions`."""


def context_labels(
    fsm: FSM, tokens: Int[Tensor, "*batch pos"], phase: int = 0
) -> Int[Tensor, "*batch pos"]:
    """Label the positions `phase` tokens after a state's last digit; -1 elsewhere.

    Phase 0 is where a state s is determined (its last digit): the label is s. At phase j > 0
    the model has read s and the first j digits of the next state, v their value: the label is
    `s * base**j + v` (s is still the current state, written j digits into its successor).
    """
    d, base = fsm.digits_per_state, fsm.base
    if isinstance(phase, bool) or not isinstance(phase, int) or not 0 <= phase < d:
        raise ValueError(
            f"phase must be an integer in 0..{d - 1} ({d} digits per state), got {phase!r}."
        )
    state = determined_states(fsm, tokens, hold=True)
    value = torch.zeros_like(tokens)
    valid = state >= 0
    for i in range(phase):  # digit i of the next state sits phase - 1 - i positions back
        digit = tokens.roll(phase - 1 - i, dims=-1)
        valid &= digit < base
        value = value * base + digit
    label = torch.where(valid, state * base**phase + value, -1)
    position = torch.arange(tokens.shape[-1], device=tokens.device)
    return torch.where((position % d == phase) & (position >= d), label, -1)


def num_context_labels(fsm: FSM, phase: int) -> int:
    return fsm.n_states * fsm.base**phase


@torch.no_grad()
def collect_codes(
    model: HookedCodebookTransformer, tokens: Int[Tensor, "batch pos"], batch_size: int = 128
) -> dict[str, Int[Tensor, "batch pos n_groups k"]]:
    """The code ids at every codebook site for every token (on the CPU)."""
    sites = list(model.codebooks)
    if not sites:
        raise ValueError("collect_codes needs a model with codebooks; it has none.")
    names = [f"{site}.hook_codes" for site in sites]
    collected: dict[str, list[Tensor]] = {site: [] for site in sites}
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        for batch in tokens.split(batch_size):
            _, cache = model.run_with_cache(batch.to(device), names_filter=names)
            for site in sites:
                collected[site].append(cache[f"{site}.hook_codes"].cpu())
    finally:
        model.train(was_training)
    return {site: torch.cat(ids) for site, ids in collected.items()}


def state_code_scores(
    model: HookedCodebookTransformer,
    fsm: FSM,
    tokens: Int[Tensor, "batch pos"],
    phases: int | None = None,
    batch_size: int = 128,
) -> list[dict[str, ConceptScores]]:
    """Precision and recall of every code at every site for "the current state is s".

    Entry 0 scores the positions where a state is determined (its last digit, see
    `determined_states`) against the state; entry j (up to `phases`, default every digit of a
    state) the positions j digits into the next state against (state, digits so far), see
    `context_labels`. One forward pass over `tokens` serves every phase.

    Args:
        model: a model with codebooks; every codebook is scored.
        fsm: the machine that wrote `tokens`.
        tokens: BOS-led token ids `[batch, pos]`.
        phases: how many phases to score (1..digits_per_state).
        batch_size: sequences per forward pass.

    Returns:
        One `{site: ConceptScores}` per phase; the scores hold per (group, code, label)
            precision and recall.

    Raises:
        ValueError: for `phases` outside 1..digits_per_state, or sequences that do not start
            with BOS.
    """
    n_phases = fsm.digits_per_state if phases is None else phases
    if not 1 <= n_phases <= fsm.digits_per_state:
        raise ValueError(
            f"phases must be in 1..{fsm.digits_per_state} (digits per state), got {phases!r}."
        )
    codes = collect_codes(model, tokens, batch_size)
    results = []
    for phase in range(n_phases):
        labels = context_labels(fsm, tokens.cpu(), phase)
        keep = labels >= 0
        results.append(
            {
                site: code_concept_precision_recall(
                    ids[keep],
                    labels[keep],
                    model.codebooks[site].cfg.num_codes,
                    num_context_labels(fsm, phase),
                )
                for site, ids in codes.items()
            }
        )
    return results


@dataclass(frozen=True)
class GroupBestCodes:
    """For every group and label, the code with the highest F1 for it, and that code's scores:
    what steering reads, computed once from a `ConceptScores`."""

    code: Int[Tensor, "n_groups num_labels"]
    f1: Float[Tensor, "n_groups num_labels"]
    precision: Float[Tensor, "n_groups num_labels"]
    recall: Float[Tensor, "n_groups num_labels"]
    label_counts: Int[Tensor, " num_labels"]

    @classmethod
    def from_scores(cls, scores: ConceptScores) -> GroupBestCodes:
        f1, code = scores.f1().max(dim=1)  # over codes
        return cls(
            code=code,
            f1=f1,
            precision=scores.precision.gather(1, code[:, None, :])[:, 0],
            recall=scores.recall.gather(1, code[:, None, :])[:, 0],
            label_counts=scores.label_counts,
        )


def summarize_state_codes(
    scores: Mapping[str, ConceptScores], n_states: int, threshold: float = 0.9
) -> dict[str, Any]:
    """JSON-ready summary: per site and overall, the fraction of states with a precise code
    (precision and recall >= threshold), each state's best code, and a code x state heat map
    (P(state | code) for the best codes of the site with the most precise states).

    A state's best code maximises min(precision, recall), so a state has a precise code exactly
    when its best code's precision and recall both reach the threshold.

    Args:
        scores: phase 0 of `state_code_scores`: `{site: ConceptScores}`.
        n_states: the FSM's states.
        threshold: the precision and recall a precise code needs.
    """
    per_site: dict[str, Any] = {}
    precise_anywhere = torch.zeros(n_states, dtype=torch.bool)
    seen = torch.zeros(n_states, dtype=torch.bool)
    best_overall: list[dict[str, Any]] = [{} for _ in range(n_states)]
    for site, site_scores in scores.items():
        occurring = site_scores.label_counts > 0
        if not occurring.any():
            continue
        seen |= occurring
        best = site_scores.best_code_per_label("min")
        precise = occurring & (best.score >= threshold)
        precise_anywhere |= precise
        rows = []
        for state in range(n_states):
            p, r = float(best.precision[state]), float(best.recall[state])
            row = {
                "state": state,
                "group": int(best.group[state]),
                "code": int(best.code[state]),
                "precision": p,
                "recall": r,
                "f1": 2 * p * r / (p + r) if p + r > 0 else 0.0,
            }
            rows.append(row)
            current = best_overall[state]
            if not current or min(p, r) > min(current["precision"], current["recall"]):
                best_overall[state] = {"site": site, **row}
        per_site[site] = {
            "states_with_precise_code": precise[occurring].float().mean().item(),
            "mean_best_f1": sum(r["f1"] for r, o in zip(rows, occurring) if o)
            / int(occurring.sum()),
            "best": rows,
        }
    if not seen.any():
        raise ValueError("no determined state in the data: cannot score state codes.")
    heat_site = max(
        per_site,
        key=lambda s: (per_site[s]["states_with_precise_code"], per_site[s]["mean_best_f1"]),
    )
    return {
        "threshold": threshold,
        "states_with_precise_code": precise_anywhere[seen].float().mean().item(),
        "per_site": per_site,
        "best_per_state": best_overall,
        "heatmap": _heatmap(scores[heat_site], heat_site, per_site[heat_site]["best"]),
    }


def _heatmap(scores: ConceptScores, site: str, best: list[dict[str, Any]]) -> dict[str, Any]:
    """P(state | code) for the distinct best codes of `site`, ordered by the state they mean."""
    slots: list[tuple[int, int]] = []
    for row in sorted(best, key=lambda r: r["state"]):
        slot = (row["group"], row["code"])
        if row["code"] >= 0 and slot not in slots:
            slots.append(slot)
    return {
        "site": site,
        "codes": [f"g{g}:c{c}" if scores.precision.shape[0] > 1 else f"c{c}" for g, c in slots],
        "precision": [[round(v, 4) for v in scores.precision[g, c].tolist()] for g, c in slots],
    }


# -- steering ----------------------------------------------------------------------------------


def steering_codes(
    scores: Mapping[str, ConceptScores | GroupBestCodes],
    label: int,
    min_precision: float = 0.0,
    best_site_only: bool = False,
) -> SteeringSpec:
    """The codes that put the model in context `label` (a state, at phase 0).

    Every (site, group) whose best code for `label` (by F1) has precision >= `min_precision`
    takes part; with `best_site_only`, or when none qualifies, only the (site, group) whose code
    has the highest F1. Empty when `label` never occurred in the scored data.

    Returns:
        `{site: {group: [code]}}`, ready for `force_codes`.

    Raises:
        ValueError: for a `label` outside the scored labels.
    """
    spec: SteeringSpec = {}
    best: tuple[float, str, int, int] = (-1.0, "", -1, -1)
    for site, site_scores in scores.items():
        table = (
            site_scores
            if isinstance(site_scores, GroupBestCodes)
            else GroupBestCodes.from_scores(site_scores)
        )
        n_labels = table.label_counts.shape[0]
        if not 0 <= label < n_labels:
            raise ValueError(f"label {label} out of range: the scores cover 0..{n_labels - 1}.")
        if table.label_counts[label] == 0:
            return {}
        codes, f1 = table.code[:, label], table.f1[:, label]
        precision, recall = table.precision[:, label], table.recall[:, label]
        for group in range(codes.shape[0]):
            if f1[group] > best[0]:
                best = (float(f1[group]), site, group, int(codes[group]))
            if precision[group] >= min_precision and recall[group] > 0:
                spec.setdefault(site, {})[group] = [int(codes[group])]
    if best_site_only or not spec:
        _, site, group, code = best
        spec = {site: {group: [code]}}
    return spec


def _digits_value(digits: list[int], base: int) -> int | None:
    value = 0
    for digit in digits:
        if not 0 <= digit < base:
            return None
        value = value * base + digit
    return value


@torch.no_grad()
def generate_steered(
    model: HookedCodebookTransformer,
    fsm: FSM,
    prompts: Int[Tensor, "batch prompt_len"],
    target: int,
    spec_for: SpecFor | None,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
) -> Int[Tensor, "batch total_len"]:
    """The prompts followed by the next state's digits, generated while steering to `target`.

    The prompt's last token ends the current state. For each digit j of the next state, the
    codes `spec_for(i, label)` are forced at the prompt's last position + i for every i <= j,
    where label is the context "state `target`, then the i digits generated so far" (see
    `context_labels`). `spec_for=None` forces nothing.
    """
    d, base = fsm.digits_per_state, fsm.base
    last = prompts.shape[1] - 1
    tokens = prompts.cpu()
    for j in range(d):
        next_token = torch.empty(tokens.shape[0], dtype=torch.long)
        generated = tokens[:, last + 1 :]
        # rows that generated the same digits so far share their forced codes
        groups: list[list[int]] = [[]]
        which = torch.zeros(tokens.shape[0], dtype=torch.long)
        if j > 0:
            unique, which = torch.unique(generated, dim=0, return_inverse=True)
            groups = unique.tolist()
        for index, prefix in enumerate(groups):
            rows = which == index
            with ExitStack() as stack:
                for i in range(j + 1):
                    value = _digits_value(prefix[:i], base)
                    spec = None
                    if spec_for is not None and value is not None:
                        spec = spec_for(i, target * base**i + value)
                    if spec:
                        stack.enter_context(model.force_codes(spec, positions=[last + i]))
                sample = sample_sequences(
                    model, tokens[rows], tokens.shape[1] + 1, temperature, generator
                )
            next_token[rows] = sample[:, -1]
        tokens = torch.cat([tokens, next_token[:, None]], dim=1)
    return tokens


@torch.no_grad()
def generate_next_state(
    model: HookedCodebookTransformer,
    fsm: FSM,
    prompts: Int[Tensor, "batch prompt_len"],
    target: int,
    spec_for: SpecFor | None,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
) -> Int[Tensor, " batch"]:
    """The next state generated after each prompt while steering towards state `target` (see
    `generate_steered`); -1 where the digits are not a state."""
    tokens = generate_steered(model, fsm, prompts, target, spec_for, temperature, generator)
    return fsm.tokens_to_states(tokens)[:, -1]


def evaluate_interventions(
    model: HookedCodebookTransformer,
    fsm: FSM,
    phase_scores: list[dict[str, ConceptScores]],
    n_prompts: int = 400,
    prompt_states: int = 3,
    temperature: float = 1.0,
    min_precision: float = 0.0,
    seed: int = 0,
    progress: bool = True,
    js_divergence: bool = True,
) -> dict[str, Any]:
    """Steer prompts in state s to a random other state s′ and score the next generated state.

    Prompts are BOS + a random walk of `prompt_states` states (s is the last). `phase_scores`
    comes from `state_code_scores`. Conditions (`CONDITIONS`):
    `none` no intervention; `steer` s′'s best code at every (site, group) whose code for it has
    precision >= `min_precision`, at every position until the next state is written (phase j
    uses the codes for "s′ then the j digits written so far"); `steer_best_site` only the single
    best (site, group); `steer_last_position` only at the prompt's last position (phase 0);
    `random_code` random codes in `steer`'s slots and positions.
    Per condition: `success` = the next state is a successor of s′, `follows_source` = it is a
    successor of s (the two overlap where s and s′ share successors, see `chance_overlap`);
    `js_divergence` = the reference's measure, the mean Jensen-Shannon divergence (bits)
    between the exact next-state distribution under the condition and s′'s true one
    (`tl_codebook.fsm.divergence`; with `js_divergence=False` it is left out).

    Returns:
        JSON-ready results: per condition `{"success", "follows_source", "js_divergence"}`
            (fractions of the prompts; mean bits), plus the settings, `mean_slots_forced` and
            `chance_overlap`.

    Raises:
        ValueError: for `n_prompts < 1` or `prompt_states < 1`.
    """
    if n_prompts < 1 or prompt_states < 1:
        raise ValueError(
            f"n_prompts and prompt_states must be >= 1, got {n_prompts}, {prompt_states}."
        )
    task = TokFSMTask(fsm, int(model.cfg.n_ctx), steering_prompt_states=prompt_states)
    generator = torch.Generator().manual_seed(seed)
    trials = task.steering_trials(n_prompts, generator=generator)
    sources, targets, prompts = trials.sources, trials.targets, trials.prompts
    tables = [
        {site: GroupBestCodes.from_scores(scores) for site, scores in phase.items()}
        for phase in phase_scores
    ]

    def steer(phase: int, label: int) -> SteeringSpec:
        return steering_codes(tables[phase], label, min_precision)

    def best_site(phase: int, label: int) -> SteeringSpec:
        return steering_codes(tables[phase], label, min_precision, best_site_only=True)

    def last_position(phase: int, label: int) -> SteeringSpec | None:
        return steer(phase, label) if phase == 0 else None

    def random_code(phase: int, label: int) -> SteeringSpec:
        return random_codes_like(steer(phase, label), model, generator)

    spec_fors: dict[str, SpecFor | None] = {
        "none": None,
        "steer": steer,
        "steer_best_site": best_site,
        "steer_last_position": last_position,
        "random_code": random_code,
    }
    generated = {c: torch.zeros(n_prompts, trials.total_len, dtype=torch.long) for c in CONDITIONS}
    unique_targets = targets.unique().tolist()
    divergence: dict[str, Tensor] = {}
    bar = tqdm(
        total=len(unique_targets) * len(CONDITIONS) * (2 if js_divergence else 1),
        desc="interventions",
        disable=not progress,
        dynamic_ncols=True,
    )
    for target in unique_targets:
        rows = targets == target
        for condition in CONDITIONS:
            generated[condition][rows] = generate_steered(
                model, fsm, prompts[rows], target, spec_fors[condition], temperature, generator
            )
            bar.update()
            if js_divergence:
                js = intervention_divergence(
                    model, fsm, prompts[rows], targets[rows], spec_fors[condition]
                )
                divergence.setdefault(condition, torch.empty(n_prompts))[rows] = js
                bar.update()
    bar.close()
    matrix = fsm.transition_matrix
    results: dict[str, Any] = {
        condition: {
            "success": task.steering_success(trials, tokens).float().mean().item(),
            "follows_source": task.steering_success(trials.aimed_at_sources(), tokens)
            .float()
            .mean()
            .item(),
            **(
                {"js_divergence": divergence[condition].mean().item()}
                if condition in divergence
                else {}
            ),
        }
        for condition, tokens in generated.items()
    }
    slots = [sum(len(g) for g in steer(0, t).values()) for t in unique_targets]
    shared = (matrix[targets] & matrix[sources]).sum(-1).float() / fsm.n_edges
    results.update(
        n_prompts=n_prompts,
        prompt_states=prompt_states,
        temperature=temperature,
        min_precision=min_precision,
        mean_slots_forced=sum(slots) / max(len(slots), 1),
        chance_overlap=shared.mean().item(),
    )
    return results
