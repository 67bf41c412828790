"""Every public name has a docstring of its own, and every CLI option says what it is.

"Public" is what the API reference pages show: each name in the `__all__` of the packages that
`docs/hooks/generated_pages.py` documents, and the public methods and properties that our own
classes define in their bodies (or in our own base classes). Names inherited from TransformerLens, torch or SAELens keep their
own documentation and are not checked; dataclasses' generated `Name(field=..., ...)` signature
is not a docstring. Module-level constants are checked for an attribute docstring (a string
right after the assignment, which mkdocstrings shows) by reading the defining module's source.
The CLI half checks each `tl-codebook` subcommand's description and each option's `help`.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import inspect
import pkgutil
from functools import cached_property
from pathlib import Path
from types import FunctionType, ModuleType
from typing import Any

import tl_codebook
from tl_codebook.cli import build_parser

PUBLIC_MODULES = (
    "tl_codebook",
    "tl_codebook.hooks",
    "tl_codebook.training",
    "tl_codebook.analysis",
    "tl_codebook.comparisons",
    "tl_codebook.fsm",
    "tl_codebook.tasks",
    "tl_codebook.io",
    "tl_codebook.text",
    "tl_codebook.comparisons.circuits",
    "tl_codebook.circuit_tasks",
)

PACKAGE_DIR = Path(tl_codebook.__file__).resolve().parent


def _public_names(module: ModuleType) -> list[str]:
    names = getattr(module, "__all__", None)
    assert names is not None, f"{module.__name__} has no __all__ (its reference page is empty)"
    return list(names)


def _own_doc(obj: Any) -> str:
    """The docstring `obj` itself carries: not a base class's, not a generated signature."""
    if inspect.isclass(obj):
        doc = obj.__dict__.get("__doc__") or ""
        if doc.startswith(f"{obj.__name__}("):  # dataclass / NamedTuple generated signature
            return ""
        return doc.strip()
    return (inspect.unwrap(obj).__doc__ or "").strip()


def _members(cls: type) -> list[tuple[str, Any]]:
    """(name, function or property) for the public callables `cls` gets from tl_codebook code:
    its own body and any tl_codebook base class (private mixins included), not TL/torch/SAELens.
    """
    found = []
    seen: set[str] = set()
    bodies = [vars(k) for k in cls.__mro__ if k.__module__.startswith("tl_codebook")]
    for name, value in ((n, v) for body in bodies for n, v in body.items()):
        if name.startswith("_") or name in seen:
            continue
        seen.add(name)
        if isinstance(value, (staticmethod, classmethod)):
            value = value.__func__
        if isinstance(value, property):
            found.append((name, value.fget))
        elif isinstance(value, cached_property):
            found.append((name, value.func))
        elif isinstance(value, FunctionType) or inspect.isfunction(inspect.unwrap(value)):
            found.append((name, value))
    return found


def _module_sources() -> dict[str, ast.Module]:
    sources = {}
    for info in pkgutil.walk_packages([str(PACKAGE_DIR)], prefix="tl_codebook."):
        spec = importlib.util.find_spec(info.name)
        if spec is None or spec.origin is None or not spec.origin.endswith(".py"):
            continue
        sources[info.name] = ast.parse(Path(spec.origin).read_text(encoding="utf-8"))
    sources["tl_codebook"] = ast.parse((PACKAGE_DIR / "__init__.py").read_text(encoding="utf-8"))
    return sources


def _assigned_names(node: ast.stmt) -> list[str]:
    if isinstance(node, ast.Assign):
        return [t.id for t in node.targets if isinstance(t, ast.Name)]
    if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
        return [node.target.id]
    return []


def _defining_module(module_name: str, name: str, sources: dict[str, ast.Module]) -> str | None:
    """The module whose top level assigns `name`, following `from X import name` and the
    package's lazy `_LAZY` table from `module_name` (None when the trail ends nowhere)."""
    tree = sources.get(module_name)
    if tree is None:
        return None
    for node in tree.body:
        if name in _assigned_names(node):
            return module_name
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if any((alias.asname or alias.name) == name for alias in node.names):
                return _defining_module(node.module, name, sources)
    lazy = getattr(importlib.import_module(module_name), "_LAZY", {})
    if name in lazy:
        return _defining_module(lazy[name], name, sources)
    return None


def _constant_doc(module_name: str, name: str, sources: dict[str, ast.Module]) -> str | None:
    """The attribute docstring after the module-level assignment of `module_name.name`.

    Returns None when no module can be found to assign it, "" when the assignment has no
    string right after it.
    """
    defining = _defining_module(module_name, name, sources)
    if defining is None:
        return None
    body = sources[defining].body
    for i, node in enumerate(body):
        if name in _assigned_names(node):
            after = body[i + 1] if i + 1 < len(body) else None
            if (
                isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)
                and after.value.value.strip()
            ):
                return after.value.value.strip()
    return ""


def _api_offenders() -> list[str]:
    offenders = []
    sources = _module_sources()
    for module_name in PUBLIC_MODULES:
        module = importlib.import_module(module_name)
        for name in _public_names(module):
            where = f"{module_name}.{name}"
            obj = getattr(module, name)
            if inspect.isclass(obj) or callable(obj) and not isinstance(obj, type):
                if inspect.isclass(obj) or inspect.isfunction(inspect.unwrap(obj)):
                    if not _own_doc(obj):
                        offenders.append(f"{where}: no docstring of its own")
                    if inspect.isclass(obj):
                        for member, func in _members(obj):
                            if not _own_doc(func):
                                offenders.append(f"{where}.{member}: no docstring")
                    continue
            doc = _constant_doc(module_name, name, sources)
            if doc is None:
                offenders.append(f"{where}: a constant no tl_codebook module assigns")
            elif not doc:
                offenders.append(f"{where}: no attribute docstring after its assignment")
    return sorted(set(offenders))


def test_cli_entry_points_have_docstrings() -> None:
    from tl_codebook import cli

    missing = [f.__name__ for f in (cli.build_parser, cli.main) if not _own_doc(f)]
    assert not missing, f"tl_codebook.cli functions without a docstring: {missing}"


def test_public_api_has_docstrings() -> None:
    offenders = _api_offenders()
    assert not offenders, "public names without a docstring:\n" + "\n".join(offenders)


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_cli_subcommands_and_options_have_help() -> None:
    offenders = []
    subcommands = _subcommands()
    assert subcommands, "tl-codebook has no subcommands"
    for name, sub in subcommands.items():
        if not (sub.description or "").strip():
            offenders.append(f"tl-codebook {name}: no description")
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction) or action.help == argparse.SUPPRESS:
                continue
            if not (action.help or "").strip():
                flag = "/".join(action.option_strings) or action.dest
                offenders.append(f"tl-codebook {name} {flag}: no help")
    assert not offenders, "CLI without help text:\n" + "\n".join(offenders)
