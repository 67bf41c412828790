"""The documentation pages generated from the code say what the code has.

`docs/hooks/generated_pages.py` builds the CLI reference from `tl-codebook`'s parser, one API
page per package from its `__all__`, and a tutorial page per example. These tests check those
pages against the code they come from (the strict `mkdocs build` in CI checks links and
rendering): every subcommand and option, every exported name, every example's code.
"""

from __future__ import annotations

import argparse
import importlib.util
import re
from pathlib import Path

import jupytext
import pytest

from tl_codebook.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]


def _load_hooks():
    spec = importlib.util.spec_from_file_location(
        "generated_pages", ROOT / "docs" / "hooks" / "generated_pages.py"
    )
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


pages = _load_hooks()


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_cli_reference_has_every_subcommand_and_option() -> None:
    text = pages.cli_reference()
    subcommands = _subcommands()
    assert {"demo", "train", "cache", "search", "dashboard", "compare"} <= set(subcommands)
    for name, sub in subcommands.items():
        section = text.split(f"## `tl-codebook {name}`", 1)
        assert len(section) == 2, f"no section for {name}"
        body = section[1].split("\n## `tl-codebook ", 1)[0]
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            for flag in action.option_strings:
                assert f"`{flag}`" in body, (name, flag)
            if action.help and action.help != argparse.SUPPRESS:
                first_words = " ".join(action.help.split()[:3]).replace("|", "\\|")
                assert first_words in body, (name, action.dest, first_words)


def test_cli_reference_shows_defaults_and_choices() -> None:
    text = pages.cli_reference()
    train = text.split("## `tl-codebook train`", 1)[1].split("\n## `tl-codebook ", 1)[0]
    row = next(line for line in train.splitlines() if line.startswith("| `--mode`"))
    assert "`joint`" in row and "`frozen`" in row  # the default and the choices
    row = next(line for line in train.splitlines() if line.startswith("| `--num-codes`"))
    assert "`1000`" in row


@pytest.mark.parametrize("package", list(pages.API_PACKAGES))
def test_api_page_documents_or_links_every_exported_name(package: str) -> None:
    module = importlib.import_module(package)
    text = pages.api_reference(package, pages.API_PACKAGES[package])
    documented = set(re.findall(r"^::: (\S+)$", text, flags=re.MULTILINE))
    linked = set(re.findall(r"\]\[([\w.]+)\]", text))
    for name in module.__all__:
        target = pages.api_target(package, name)
        assert target in documented | linked, (package, name, target)
        assert target.rsplit(".", 1)[-1] in (name, getattr(getattr(module, name), "__name__", ""))


def test_every_name_is_documented_on_exactly_one_page() -> None:
    homes: dict[str, list[str]] = {}
    for package, summary in pages.API_PACKAGES.items():
        for target in re.findall(r"^::: (\S+)$", pages.api_reference(package, summary), re.M):
            homes.setdefault(target, []).append(package)
    assert homes, "no entries at all"
    assert {t: p for t, p in homes.items() if len(p) > 1} == {}


def test_tutorial_page_holds_every_code_cell_of_its_example() -> None:
    examples = pages.example_files()
    assert examples, "no examples"
    for path in examples:
        text = pages.tutorial_page(path)
        notebook = jupytext.read(path, fmt="py:percent")
        title = notebook.cells[0].source.splitlines()[0]
        assert text.startswith(title), path.name
        for cell in notebook.cells:
            if cell.cell_type == "code" and cell.source.strip():
                assert f"```python\n{cell.source.strip()}\n```" in text, path.name
