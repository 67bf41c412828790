"""The `tl-codebook demo` subcommand: the TokFSM experiment end to end, with no arguments needed.

Options choose the scale (the CPU default, `--preset`), the output directory, any single config
field (`--set key=value`) and what to do with a directory that already holds a run (`--resume`,
`--overwrite`); the work itself lives in `tl_codebook.fsm.experiment`. Bad options raise a
ValueError, which `tl-codebook` prints as one line (exit code 2).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tl_codebook.configs import did_you_mean

if TYPE_CHECKING:
    from tl_codebook.fsm.config import ExperimentConfig

DEMO_HELP = (
    "Train a small transformer on a random finite state machine (TokFSM), fine-tune it with "
    "codebooks, find each state's code, steer the model through those codes, and write a report."
)
DEFAULT_PRESET = "cpu"


def add_demo_command(parser: argparse.ArgumentParser) -> None:
    """Add the `demo` options to `parser` and set `func` (for the `tl-codebook` SUBCOMMANDS)."""
    from tl_codebook.fsm.config import PRESETS

    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="report directory (default: runs/tokfsm-<timestamp>)",
    )
    parser.add_argument(
        "--paper-scale",
        action="store_true",
        help="the paper's setting: N=100, E=10, 4 layers, d_model 128, 1000 codes, batch 512, "
        "20k steps (for a GPU); same as --preset paper",
    )
    from tl_codebook.text.config import LM_PRESETS

    parser.add_argument(
        "--task",
        choices=("tokfsm", "lm"),
        default="tokfsm",
        help="tokfsm (default): the paper's TokFSM experiment; lm: its language-model half on "
        "SmolLM2-135M and BBC News (presets cpu, toy, paper)",
    )
    parser.add_argument(
        "--scale",
        choices=sorted(LM_PRESETS),
        default=None,
        help="--task lm: the same as --preset (cpu: under 30 minutes on 2 cores; paper: for a GPU)",
    )
    parser.add_argument(
        "--preset",
        choices=sorted(set(PRESETS) | set(LM_PRESETS)),
        default=None,
        help="starting configuration: cpu (default, a few minutes on 2 cores), paper-fsm (the "
        "paper's N=100/E=10 machine and codebook sites, under 30 minutes on 2 cores), paper "
        "(the paper's model and steps, for a GPU), toy (seconds; for smoke tests)",
    )
    parser.add_argument(
        "--config", type=Path, default=None, help="a JSON file of config fields to apply"
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config field, e.g. --set base_steps=2000 (repeatable)",
    )
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: auto)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    what = parser.add_mutually_exclusive_group()
    what.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out with its saved config: finished phases are loaded, an "
        "interrupted training phase continues from its last checkpoint",
    )
    what.add_argument(
        "--overwrite",
        action="store_true",
        help="delete the run already in --out and start over",
    )
    parser.set_defaults(func=run_demo)


def _parse_value(key: str, raw: str, current: Any) -> Any:
    """Parse `raw` as JSON when the field is not a string; strings are taken as they are."""
    if isinstance(current, str):
        return raw
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        raise ValueError(
            f"--set {key}={raw}: not a valid value for {key} (current value {current!r})."
        ) from None


def _read_config_file(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"--config {path}: not valid JSON ({err}).") from None
    if not isinstance(data, dict):
        raise ValueError(f"--config {path}: expected a JSON object of config fields.")
    return data


def config_from_args(args: argparse.Namespace) -> ExperimentConfig:
    """The ExperimentConfig that `args` describe: preset, then --config, then each --set; with
    --resume, the run's saved config (only --device and --no-progress may change it)."""
    from tl_codebook.fsm.config import PRESETS, ExperimentConfig
    from tl_codebook.fsm.metrics_file import read_metrics

    resume = getattr(args, "resume", False)
    if resume:
        given = [
            flag
            for flag, value in (
                ("--preset", args.preset),
                ("--paper-scale", args.paper_scale or None),
                ("--config", args.config),
                ("--set", args.overrides or None),
            )
            if value is not None
        ]
        if given:
            raise ValueError(
                f"--resume continues the run with its saved config; drop {', '.join(given)}."
            )
        if args.out is None:
            raise ValueError("--resume needs --out, the directory of the run to continue.")
        config = ExperimentConfig.from_dict(read_metrics(args.out).get("config", {}))
    else:
        if args.paper_scale and args.preset not in (None, "paper"):
            raise ValueError(
                f"--paper-scale is --preset paper; it contradicts --preset {args.preset}."
            )
        preset = "paper" if args.paper_scale else args.preset or DEFAULT_PRESET
        config = PRESETS[preset]()
    changes: dict[str, Any] = {}
    if args.config is not None:
        changes.update(_read_config_file(Path(args.config)))
    current = config.to_dict()
    for item in args.overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}.")
        if key not in current:
            raise ValueError(
                f"--set: unknown config field {key!r}.{did_you_mean(key, current)} "
                f"Valid fields: {', '.join(current)}."
            )
        changes[key] = _parse_value(key, raw, current[key])
    if args.device is not None:
        changes["device"] = args.device
    if args.no_progress:
        changes["progress"] = False
    return config.replace(**changes) if changes else config


def run_demo(args: argparse.Namespace) -> int:
    from tl_codebook.fsm.experiment import run_experiment

    if args.task == "lm":
        from tl_codebook.text.cli import run_lm_demo

        return run_lm_demo(args)
    if args.scale is not None:
        raise ValueError("--scale is for --task lm; TokFSM takes --preset.")
    config = config_from_args(args)
    out = args.out or Path("runs") / time.strftime("tokfsm-%Y%m%d-%H%M%S")
    metrics = run_experiment(config, out, resume=args.resume, overwrite=args.overwrite)
    print(json.dumps({k: metrics.get(k) for k in _SUMMARY_KEYS}, indent=2))
    return 0


_SUMMARY_KEYS = (
    "base_transition_accuracy",
    "codebook_transition_accuracy",
    "states_with_precise_code",
    "intervention_success",
    "intervention_success_random_code",
    "seconds",
)
