"""The `tl-codebook` command: one entry point, one subcommand per job (train, demo, compare, ...).

Subcommands register themselves in `SUBCOMMANDS`, so each job's options live next to its code.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

import tl_codebook

SubcommandSetup = Callable[[argparse.ArgumentParser], None]
SUBCOMMANDS: dict[str, tuple[str, SubcommandSetup]] = {}
"""name -> (one-line help, function that adds the subcommand's arguments and sets `func`)."""


def _register_builtin_commands() -> None:
    from tl_codebook.comparisons.cli import add_compare_command
    from tl_codebook.fsm.cli import add_demo_command
    from tl_codebook.training.cli import add_train_command

    builtin = {
        "demo": (
            "The paper's TokFSM experiment end to end: train, find state codes, steer, report.",
            add_demo_command,
        ),
        "train": (
            "Train codebooks on a TransformerLens model (frozen or joint).",
            add_train_command,
        ),
        "compare": (
            "Codebooks vs SAEs (SAELens) on one shared activation cache: train, score, report.",
            add_compare_command,
        ),
    }
    for name, entry in builtin.items():
        SUBCOMMANDS.setdefault(name, entry)


def build_parser() -> argparse.ArgumentParser:
    _register_builtin_commands()
    parser = argparse.ArgumentParser(
        prog="tl-codebook",
        description=(
            "Codebook features for TransformerLens: insert sparse, discrete codebook bottlenecks "
            "at hook points, train them, and analyse and steer models through their codes."
        ),
    )
    parser.add_argument(
        "--version", action="version", version=f"tl-codebook {tl_codebook.__version__}"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help_text, setup) in SUBCOMMANDS.items():
        setup(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 0
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
