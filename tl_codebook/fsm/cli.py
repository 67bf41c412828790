"""The `tl-codebook demo` subcommand: the TokFSM experiment end to end, with no arguments needed.

Options choose the scale (the CPU default, `--paper-scale`), the output directory and any single
config field (`--set key=value`); the work itself lives in `tl_codebook.fsm.experiment`.
"""

from __future__ import annotations

import argparse
import difflib
import json
import sys
import time
from pathlib import Path
from typing import Any

DEMO_HELP = (
    "Train a small transformer on a random finite state machine (TokFSM), fine-tune it with "
    "codebooks, find each state's code, steer the model through those codes, and write a report."
)


def add_demo_command(parser: argparse.ArgumentParser) -> None:
    """Add the `demo` options to `parser` and set `func` (for the `tl-codebook` SUBCOMMANDS)."""
    from tl_codebook.fsm.experiment import PRESETS

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
    parser.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default="cpu",
        help="starting configuration: cpu (default, a few minutes on 2 cores), paper, toy "
        "(seconds; for smoke tests)",
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


def config_from_args(args: argparse.Namespace):  # noqa: ANN201 - ExperimentConfig, imported lazily
    """The ExperimentConfig that `args` describe: preset, then --config, then each --set."""
    from tl_codebook.fsm.experiment import PRESETS

    preset = "paper" if args.paper_scale else args.preset
    config = PRESETS[preset]()
    changes: dict[str, Any] = {}
    if args.config is not None:
        changes.update(json.loads(Path(args.config).read_text()))
    current = config.to_dict()
    for item in args.overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}.")
        if key not in current:
            close = difflib.get_close_matches(key, list(current), n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ValueError(
                f"--set: unknown config field {key!r}{hint}. Valid fields: {', '.join(current)}."
            )
        changes[key] = _parse_value(key, raw, current[key])
    if args.device is not None:
        changes["device"] = args.device
    if args.no_progress:
        changes["progress"] = False
    return config.replace(**changes) if changes else config


def run_demo(args: argparse.Namespace) -> int:
    from tl_codebook.fsm.experiment import run_experiment

    try:
        config = config_from_args(args)
    except (ValueError, OSError) as err:  # a bad --set / --config: say so, no traceback
        print(f"tl-codebook demo: error: {err}", file=sys.stderr)
        return 2
    out = args.out or Path("runs") / time.strftime("tokfsm-%Y%m%d-%H%M%S")
    metrics = run_experiment(config, out)
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
