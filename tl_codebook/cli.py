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
    from tl_codebook.analysis.cli import (
        CACHE_HELP,
        DASHBOARD_HELP,
        SEARCH_HELP,
        add_cache_command,
        add_dashboard_command,
        add_search_command,
    )
    from tl_codebook.circuit_tasks.cli import HELP as CIRCUITS_HELP
    from tl_codebook.circuit_tasks.cli import add_circuits_command
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
        "circuits": (CIRCUITS_HELP, add_circuits_command),
        "cache": (CACHE_HELP, add_cache_command),
        "search": (SEARCH_HELP, add_search_command),
        "dashboard": (DASHBOARD_HELP, add_dashboard_command),
    }
    for name, entry in builtin.items():
        SUBCOMMANDS.setdefault(name, entry)


def build_parser() -> argparse.ArgumentParser:
    """The `tl-codebook` parser: one subparser per entry of `SUBCOMMANDS` (the built-in ones
    registered first), each with its one-line help as its description and `func` set.

    The CLI reference page of the documentation is generated from this parser.
    """
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


USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, TypeError, KeyError, OSError)
"""What a subcommand raises for bad input (a bad value, a missing or unreadable file, a locked
run directory): `main` prints one line naming it and exits 2. `--traceback` shows the stack."""

EXIT_USER_ERROR = 2
"""The exit code of a user error (argparse's own code for bad arguments)."""


def user_error_message(err: BaseException) -> str:
    """The one line printed for a user error: the message, or the exception's name when empty."""
    text = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
    text = " ".join(text.split())  # one line, however the message was built
    return text or type(err).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Run `tl-codebook`; every user error is one line on stderr and exit code 2.

    Args:
        argv: the arguments (default: `sys.argv[1:]`).

    Returns:
        The exit code: the subcommand's (0 on success), `EXIT_USER_ERROR` for one of
            `USER_ERRORS`; without a subcommand the help is printed and 0 returned. Other
            exceptions propagate (a bug, or `--traceback`).
    """
    parser = build_parser()
    parser.add_argument(
        "--traceback", action="store_true", help="show the full traceback of an error"
    )
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except USER_ERRORS as err:
        if args.traceback:
            raise
        print(f"tl-codebook {args.command}: error: {user_error_message(err)}", file=sys.stderr)
        return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
