"""The TokFSM experiment end to end: train a base model, fine-tune it jointly with codebooks, find
each state's code, steer the model through those codes, and write everything to a run directory.

It is the project's main job (`tl-codebook demo`). The last phase keeps the codebook model's code
ids over the held-out sequences (`code_cache/`, a `CodeCache`) and writes the offline code
browser (`dashboard/`), labelled with the FSM states. Each phase saves its results (metrics.json,
weights, the report) before the next starts, and the two training phases checkpoint into
`training/<phase>/` as they go; so a run killed at any point leaves a readable report of what it
finished, and `resume=True` (`tl-codebook demo --resume`) continues it: finished phases are
loaded, an interrupted training phase continues from its last checkpoint.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from jaxtyping import Int
from torch import Tensor

from tl_codebook.files import atomic_write_json, locked_run_dir
from tl_codebook.fsm.config import RUN_ONLY_FIELDS, ExperimentConfig
from tl_codebook.fsm.dataset import TokFSMDataset
from tl_codebook.fsm.evaluation import dead_code_fraction, evaluate_lm, loss_floor
from tl_codebook.fsm.machine import FSM
from tl_codebook.fsm.metrics import next_token_loss
from tl_codebook.fsm.metrics_file import METRICS_FILE, read_metrics, write_metrics
from tl_codebook.fsm.models import (
    BASE_MODEL_WEIGHTS,
    CODEBOOK_MODEL_DIR,
    FSM_FILE,
    TRAINING_DIR,
    build_base_model,
    codebook_train_config,
    load_base_model,
    load_codebook_model,
    phase_dir,
    save_base_model,
    starting_model,
    train_base_model,
    train_codebook_model,
)
from tl_codebook.fsm.report import PLOT_CACHE, steering_rows, write_report
from tl_codebook.fsm.steering import (
    evaluate_interventions,
    state_code_scores,
    summarize_state_codes,
)
from tl_codebook.hooks.model import HookedCodebookTransformer
from tl_codebook.training import TrainConfig, train_codebooks
from tl_codebook.training.checkpoint import list_checkpoints
from tl_codebook.training.metrics_log import METRICS_FILE as TRAINING_LOG
from tl_codebook.training.trainer import CHECKPOINT_DIR, TrainResult

if TYPE_CHECKING:
    from tl_codebook.analysis.cache import CodeCache
    from tl_codebook.fsm.task import TokFSMTask

CODE_CACHE_DIR = "code_cache"
"""The codebook model's code ids over the held-out sequences (a `CodeCache`)."""
DASHBOARD_DIR = "dashboard"
"""The offline code browser of that cache (`dashboard/index.html`)."""

RUN_OUTPUTS = (
    METRICS_FILE,
    FSM_FILE,
    "index.html",
    "*.png",
    PLOT_CACHE,
    TRAINING_DIR,
    Path(BASE_MODEL_WEIGHTS).parent.name,
    CODEBOOK_MODEL_DIR,
    CODE_CACHE_DIR,
    DASHBOARD_DIR,
)
"""What a run writes into its directory: exactly what `overwrite=True` removes."""


def run_experiment(
    config: ExperimentConfig,
    out_dir: str | Path,
    log: Callable[[str], None] = print,
    resume: bool = False,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Run every phase, writing `metrics.json`, weights and the report into `out_dir` as it goes.

    Returns the final metrics (the content of metrics.json). A directory that already holds a
    run is refused unless `resume=True` (continue it: `config` must be the saved one, up to
    `RUN_ONLY_FIELDS`) or `overwrite=True` (delete its outputs and start over). The directory is
    locked for the run (a second run into it fails at once). On the CPU, torch uses
    `config.threads` threads during the run (the previous setting is restored after it).

    An interrupted or failed run records why in metrics.json (and the report) before the
    exception propagates; a finished run resumed returns its metrics at once.

    Args:
        config: the run's settings.
        out_dir: the run directory.
        log: called with one line per step of progress.
        resume: continue the run in `out_dir` from its checkpoints.
        overwrite: delete the outputs of a run in `out_dir` and start over.

    Raises:
        ValueError: for `resume` together with `overwrite`, a resume with nothing to resume
            or a config that differs from the saved one, or a directory holding a run
            without either flag.
        RunDirLockedError: (an OSError) when another process is running into `out_dir`.
        TrainingDivergedError: when a training phase's loss becomes NaN or infinite.
    """
    if resume and overwrite:
        raise ValueError("resume and overwrite exclude each other: continue the run or replace it.")
    out = Path(out_dir)
    device = _resolve_device(config.device)
    with locked_run_dir(out):
        metrics = _start(config, out, resume, overwrite)
        if metrics.get("status") == "done":
            log(f"the run in {out} has finished; nothing to resume")
            return metrics
        previous_threads = torch.get_num_threads()
        if device == "cpu" and config.threads > 0:
            torch.set_num_threads(config.threads)
        try:
            return _run_phases(config, out, device, metrics, log)
        except KeyboardInterrupt:
            _mark_stopped(out, "interrupted")
            raise
        except Exception as err:
            _mark_stopped(out, f"failed: {type(err).__name__}: {err}")
            raise
        finally:
            torch.set_num_threads(previous_threads)


def _resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def _start(config: ExperimentConfig, out: Path, resume: bool, overwrite: bool) -> dict[str, Any]:
    """The metrics to continue from: a fresh record, or (resume) the saved one, checked."""
    has_run = (out / METRICS_FILE).is_file()
    if resume and has_run:
        metrics = read_metrics(out)
        saved = ExperimentConfig.from_dict(metrics.get("config", {})).to_dict()
        wanted = config.to_dict()
        differing = [
            f"{key}: run {saved[key]!r} vs now {wanted[key]!r}"
            for key in wanted
            if key not in RUN_ONLY_FIELDS and saved[key] != wanted[key]
        ]
        if differing:
            raise ValueError(
                f"cannot resume the run in {str(out)!r}: its config differs ({'; '.join(differing)})."
            )
        metrics["config"] = wanted
        return metrics
    if resume:
        raise ValueError(f"nothing to resume: {str(out)!r} holds no run ({METRICS_FILE} missing).")
    if has_run and not overwrite:
        status = read_metrics(out).get("status", "unknown")
        raise ValueError(
            f"{str(out)!r} already holds a TokFSM run (status {status!r}); resume it "
            "(--resume) or replace it (--overwrite), or choose another output directory."
        )
    if overwrite:
        for pattern in RUN_OUTPUTS:
            for path in out.glob(str(pattern)):
                if path.is_dir():
                    shutil.rmtree(path)
                else:
                    path.unlink()
    return {"config": config.to_dict(), "phases": {}, "training": {}}


def _mark_stopped(out: Path, why: str) -> None:
    """Record in metrics.json (and the report) that the run stopped early, and why."""
    if not (out / METRICS_FILE).is_file():
        return
    metrics = read_metrics(out)
    metrics["status"] = why
    write_metrics(out, metrics)
    write_report(out)


def _has_checkpoint(directory: Path) -> bool:
    return bool(list_checkpoints(directory / CHECKPOINT_DIR))


def _run_phases(
    config: ExperimentConfig,
    out: Path,
    device: str,
    metrics: dict[str, Any],
    log: Callable[[str], None],
) -> dict[str, Any]:
    started = time.perf_counter()
    seconds_before = metrics.get("seconds") or 0.0
    fsm = FSM.generate(config.fsm_config())
    atomic_write_json(out / FSM_FILE, fsm.to_dict())
    dataset = TokFSMDataset(fsm, seq_len=config.seq_len, seed=config.seed)
    held_out = dataset.held_out(config.n_held_out, seed=config.seed)
    metrics.update(
        status="running",
        digits_per_state=fsm.digits_per_state,
        loss_floor=loss_floor(fsm, config.seq_len),
    )

    def save(status: str | None = None) -> None:
        if status is not None:
            metrics["status"] = status
        metrics["seconds"] = seconds_before + time.perf_counter() - started
        write_metrics(out, metrics)
        write_report(out)

    save()
    log(
        f"TokFSM: N={config.n_states} states, E={config.n_edges} edges, base {config.base} "
        f"({fsm.digits_per_state} digits/state), seq_len {config.seq_len}; model: "
        f"{config.n_layers} layers, d_model {config.d_model}, {config.n_heads} heads, d_mlp "
        f"{config.d_mlp}, {config.positional_embedding_type}; codebooks: {config.num_codes} codes, "
        f"k={config.k} at {', '.join(config.codebook_sites)} of every layer, route "
        f"{config.codebook_route}; steps: base "
        f"{config.base_steps} x {config.base_batch_size}, codebook {config.codebook_steps} x "
        f"{config.codebook_batch_size}; device {device}; writing to {out}"
    )

    def record_training(name: str, result: TrainResult, seconds: float) -> None:
        metrics["training"][name] = {
            "steps": result.steps,
            "seconds": metrics["training"].get(name, {}).get("seconds", 0.0) + seconds,
            "log": f"{TRAINING_DIR}/{name}/{TRAINING_LOG}",
        }

    # 1. the base model
    if isinstance(metrics.get("base"), dict) and (out / BASE_MODEL_WEIGHTS).is_file():
        base = load_base_model(config, fsm, out, device)
        log("1/5 base model: finished before, loaded")
    else:
        base = build_base_model(config, fsm, device)
        directory = phase_dir(out, "base")
        phase = time.perf_counter()
        result = train_base_model(
            config,
            base,
            dataset.batches(config.base_batch_size),
            out_dir=directory,
            resume=_has_checkpoint(directory),
        )
        record_training("base", result, time.perf_counter() - phase)
        save_base_model(base, out)
        metrics["base"] = evaluate_lm(base, fsm, held_out, config)
        metrics["base_transition_accuracy"] = metrics["base"]["transition_accuracy"]
        metrics["phases"]["base"] = time.perf_counter() - phase
        save()
        log(_describe("1/5 base model", metrics["base"], metrics["phases"]["base"]))

    # 2. the codebook model: joint fine-tuning from the base model
    if isinstance(metrics.get("codebook"), dict) and (out / CODEBOOK_MODEL_DIR).is_dir():
        model = load_codebook_model(base, out)
        log("2/5 codebook model: finished before, loaded")
    else:
        model = _fine_tune(config, fsm, base, held_out, out, metrics, record_training)
        save()
        log(_describe("2/5 codebook model", metrics["codebook"], metrics["phases"]["codebook"]))

    # 3. state codes (recomputed on resume: steering needs the full scores, a few seconds)
    phase = time.perf_counter()
    phase_scores = state_code_scores(model, fsm, held_out)
    summary = summarize_state_codes(phase_scores[0], fsm.n_states, config.precise_threshold)
    metrics["state_codes"] = summary
    metrics["states_with_precise_code"] = summary["states_with_precise_code"]
    metrics["phases"]["state_codes"] = time.perf_counter() - phase
    save()
    log(
        f"3/5 state codes: {summary['states_with_precise_code']:.1%} of states have a code with "
        f"precision and recall >= {config.precise_threshold} "
        f"({metrics['phases']['state_codes']:.0f}s)"
    )

    # 4. interventions
    phase = time.perf_counter()
    interventions = evaluate_interventions(
        model,
        fsm,
        phase_scores,
        n_prompts=config.n_intervention_prompts,
        prompt_states=config.intervention_prompt_states,
        temperature=config.intervention_temperature,
        min_precision=config.steering_min_precision,
        seed=config.seed + 2,
        progress=config.progress,
    )
    metrics["interventions"] = interventions
    metrics["intervention_success"] = interventions["steer"]["success"]
    metrics["intervention_success_random_code"] = interventions["random_code"]["success"]
    metrics["intervention_success_no_intervention"] = interventions["none"]["success"]
    metrics["phases"]["interventions"] = time.perf_counter() - phase
    save()
    log(
        f"4/5 interventions: success {metrics['intervention_success']:.1%} (random code "
        f"{metrics['intervention_success_random_code']:.1%}, none "
        f"{metrics['intervention_success_no_intervention']:.1%}) "
        f"({metrics['phases']['interventions']:.0f}s)"
    )

    # 5. the code cache and the code browser
    phase = time.perf_counter()
    metrics["analysis"] = write_code_browser(model, fsm, held_out, out, metrics, config.progress)
    metrics["phases"]["analysis"] = time.perf_counter() - phase
    save("done")
    analysis = metrics["analysis"]
    log(
        f"5/5 code browser: cache of {analysis['n_tokens']} tokens "
        f"({analysis['cache_bytes'] / 1e6:.2f} MB), site {analysis['site_files']} files "
        f"({analysis['site_bytes'] / 1e6:.2f} MB): {out / analysis['dashboard']} "
        f"({metrics['phases']['analysis']:.0f}s)"
    )
    log(f"done in {metrics['seconds']:.0f}s; report: {out / 'index.html'}")
    return read_metrics(out)


def _fine_tune(
    config: ExperimentConfig,
    fsm: FSM,
    base: HookedCodebookTransformer,
    held_out: torch.Tensor,
    out: Path,
    metrics: dict[str, Any],
    record_training: Callable[[str, TrainResult, float], None],
) -> HookedCodebookTransformer:
    """Phase 2: the codebook model, trained, saved and evaluated (results into `metrics`)."""
    directory = phase_dir(out, "codebook")
    phase = time.perf_counter()
    batches = TokFSMDataset(fsm, seq_len=config.seq_len, seed=config.seed + 1).batches(
        config.codebook_batch_size
    )
    model, result = train_codebook_model(
        config, base, batches, fsm, out_dir=directory, resume=_has_checkpoint(directory)
    )
    record_training("codebook", result, time.perf_counter() - phase)
    model.save_codebooks(out / CODEBOOK_MODEL_DIR, save_model_weights=True)
    evaluated = evaluate_lm(model, fsm, held_out, config)
    evaluated["next_token_loss_before_fine_tuning"] = _loss_with_initial_codebooks(
        config, fsm, base, held_out
    )
    evaluated["dead_code_fraction"] = dead_code_fraction(model, held_out[:64])
    metrics["codebook"] = evaluated
    metrics["codebook_transition_accuracy"] = evaluated["transition_accuracy"]
    metrics["phases"]["codebook"] = time.perf_counter() - phase
    return model


def _loss_with_initial_codebooks(
    config: ExperimentConfig,
    fsm: FSM,
    base: HookedCodebookTransformer,
    held_out: torch.Tensor,
) -> float:
    """Held-out loss of phase 2's starting model (`starting_model`: the base model, or a fresh
    one on the scratch route) with its codebooks just initialised, before any training: on
    the fine-tuning route, how much inserting them costs. The trainer initialises them exactly
    as in phase 2 (same config, data and seed) and takes one step at learning rate 0."""
    model = starting_model(config, base, fsm)
    batches = TokFSMDataset(fsm, seq_len=config.seq_len, seed=config.seed + 1).batches(
        config.codebook_batch_size
    )
    settings = codebook_train_config(config, fsm, None).to_dict()
    settings.update(steps=1, lr=0.0, progress=False)
    train_codebooks(model, batches, TrainConfig.from_dict(settings))
    return next_token_loss(model, held_out)


# -- the code cache and the code browser ----------------------------------------------------


def tokfsm_vocab(fsm: FSM) -> list[str]:
    """Token strings of a TokFSM model: its digits, then "BOS" (what the cache and the code
    browser show, and what a regex search reads)."""
    return [str(digit) for digit in range(fsm.base)] + ["BOS"]


def dashboard_labels(
    task: TokFSMTask, cache: CodeCache
) -> tuple[Int[Tensor, "n_seq seq_len"], list[str]]:
    """Each cached token's FSM state (where the state's last digit is read, else -1) and the
    states' names: the concept labels the code browser scores every code against."""
    tokens = torch.from_numpy(np.array(cache.tokens, dtype=np.int64))
    return task.concept_labels(tokens), task.concept_names


def write_code_browser(
    model: HookedCodebookTransformer,
    fsm: FSM,
    held_out: Int[Tensor, "n_seq seq_len"],
    out: Path,
    metrics: dict[str, Any],
    progress: bool = True,
) -> dict[str, Any]:
    """Phase 5: cache the codebook model's code ids over the held-out sequences and write the
    code browser labelled with the FSM states and the steering results; returns what
    metrics.json records (sizes on disk). Like phases 3 and 4 it is redone on resume (both
    directories are swapped in whole, so an interrupted one leaves the previous or none)."""
    from tl_codebook.analysis.cache import CodeCache
    from tl_codebook.analysis.cli import directory_size
    from tl_codebook.analysis.dashboard import write_dashboard
    from tl_codebook.fsm.task import TokFSMTask

    task = TokFSMTask(fsm, int(held_out.shape[1]))
    cache_dir, site_dir = out / CODE_CACHE_DIR, out / DASHBOARD_DIR
    cache = CodeCache.build(model, held_out, cache_dir, vocab=tokfsm_vocab(fsm), progress=progress)
    index = write_dashboard(
        cache,
        site_dir,
        model=model,
        labels=dashboard_labels(task, cache),
        steering=steering_rows(metrics.get("interventions")),
    )
    cache_bytes, cache_files = directory_size(cache_dir)
    site_bytes, site_files = directory_size(site_dir)
    return {
        "cache": CODE_CACHE_DIR,
        "n_tokens": cache.n_tokens,
        "hooks": len(cache.hooks),
        "cache_bytes": cache_bytes,
        "cache_files": cache_files,
        "dashboard": str(index.relative_to(out)),
        "site_bytes": site_bytes,
        "site_files": site_files,
    }


def _describe(name: str, results: dict[str, Any], seconds: float) -> str:
    return (
        f"{name}: transition accuracy {results['transition_accuracy']:.1%}, exact first-transition "
        f"accuracy {results['first_transition_accuracy_exact']:.1%}, held-out loss "
        f"{results['next_token_loss']:.4f} ({seconds:.0f}s)"
    )
