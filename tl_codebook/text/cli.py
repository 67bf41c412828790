"""`tl-codebook demo --task lm`: the options of `tl-codebook demo` read into an
`LMExperimentConfig`, then the run (`tl_codebook.text.experiment`)."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from tl_codebook.configs import did_you_mean
from tl_codebook.fsm.cli import _parse_value, _read_config_file
from tl_codebook.text.config import LM_PRESETS, LMExperimentConfig

DEFAULT_LM_PRESET = "cpu"


def lm_config_from_args(args: argparse.Namespace) -> LMExperimentConfig:
    """The config `args` describe: --preset/--scale, then --config, then each --set; with
    --resume, the run's saved config (only --device and --no-progress may change it).

    Raises:
        ValueError: for a TokFSM-only preset or flag, --preset and --scale that disagree, an
            unknown field or a bad value.
    """
    from tl_codebook.fsm.metrics_file import read_metrics

    if args.paper_scale:
        raise ValueError("--paper-scale is TokFSM's; for --task lm use --scale paper.")
    if args.preset and args.scale and args.preset != args.scale:
        raise ValueError(f"--preset {args.preset} and --scale {args.scale} disagree; give one.")
    preset = args.scale or args.preset
    if preset is not None and preset not in LM_PRESETS:
        raise ValueError(
            f"--task lm has no preset {preset!r}; its presets are {', '.join(sorted(LM_PRESETS))}."
        )
    if args.resume:
        given = [
            f
            for f, v in (
                ("--preset/--scale", preset),
                ("--config", args.config),
                ("--set", args.overrides or None),
            )
            if v
        ]
        if given:
            raise ValueError(
                f"--resume continues the run with its saved config; drop {', '.join(given)}."
            )
        if args.out is None:
            raise ValueError("--resume needs --out, the directory of the run to continue.")
        config = LMExperimentConfig.from_dict(read_metrics(args.out).get("config", {}))
    else:
        config = LM_PRESETS[preset or DEFAULT_LM_PRESET]()
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
        if isinstance(current[key], list) and not raw.lstrip().startswith("["):
            changes[key] = raw  # a bare list entry: `--set topics=sports,tech` (see from_dict)
        else:
            changes[key] = _parse_value(key, raw, current[key])
    if args.device is not None:
        changes["device"] = args.device
    if args.no_progress:
        changes["progress"] = False
    return config.replace(**changes) if changes else config


SUMMARY_KEYS = (
    "base_loss",
    "delta_loss",
    "ce_loss_recovered",
    "dead_fraction",
    "steering_success",
    "steering_success_none",
    "steering_success_random_code",
    "seconds",
)


def run_lm_demo(args: argparse.Namespace) -> int:
    from tl_codebook.text.experiment import run_lm_experiment

    config = lm_config_from_args(args)
    out = args.out or Path("runs") / time.strftime("lm-%Y%m%d-%H%M%S")
    metrics = run_lm_experiment(config, out, resume=args.resume, overwrite=args.overwrite)
    print(json.dumps({k: metrics.get(k) for k in SUMMARY_KEYS}, indent=2))
    return 0


__all__ = ["lm_config_from_args", "run_lm_demo"]
