"""Building config dataclasses from dicts (their JSON form) with errors a person can act on.

Every config in the package (`CodebookConfig`, `TrainConfig`, `FSMConfig`, ...) loads through
`dataclass_from_dict`, and every "not one of the valid choices" error goes through
`check_choice`, so a typo'd key, a wrong-typed value or an unknown choice reads the same
everywhere.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Iterable
from typing import Any, TypeVar

T = TypeVar("T")


def did_you_mean(value: object, valid: Iterable[str], n: int = 1) -> str:
    """ " Did you mean 'x'?" for the closest valid names to `value`, or "" when none is close."""
    close = difflib.get_close_matches(str(value), [str(v) for v in valid], n=n)
    if not close:
        return ""
    return " Did you mean " + " or ".join(repr(c) for c in close) + "?"


def check_choice(what: str, value: Any, valid: Iterable[Any]) -> Any:
    """Return `value` if it is one of `valid`, else a ValueError naming it and the choices."""
    valid = tuple(valid)
    if value not in valid:
        raise ValueError(
            f"{what}={value!r} is not one of {', '.join(map(str, valid))}."
            + did_you_mean(value, map(str, valid))
        )
    return value


_SCALARS = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


def _accepts(annotation: Any, value: Any) -> bool | None:
    """Whether `value` fits a scalar annotation (int, float, str, bool, X | None); None: not
    a scalar annotation, nothing to check."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None:
            return type(None) in options
        verdicts = [_accepts(o, value) for o in options if o is not type(None)]
        if any(v is None for v in verdicts):
            return None
        return any(verdicts)
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    return None


def _expected(annotation: Any) -> str:
    options = [a for a in typing.get_args(annotation) if a is not type(None)] or [annotation]
    words = [_SCALARS.get(a, getattr(a, "__name__", str(a))) for a in options]
    if type(None) in typing.get_args(annotation):
        words.append("null")
    return " or ".join(words)


def dataclass_from_dict(cls: type[T], data: dict[str, Any], require_all: bool = False) -> T:
    """`cls(**data)`, refusing unknown keys (with close matches), missing required keys, and
    values of the wrong scalar type (a string where a number belongs names the field).

    `require_all` also refuses keys that have defaults: for formats that must be complete.
    """
    if not isinstance(data, dict):
        raise ValueError(f"{cls.__name__} must be built from a dict, got {type(data).__name__}.")
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        detail = ", ".join(
            f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
            for name in unknown
            for close in [difflib.get_close_matches(name, list(fields), n=1)]
        )
        raise ValueError(
            f"Unknown {cls.__name__} key(s): {detail}. Valid keys: {', '.join(fields)}."
        )
    required = [
        name
        for name, f in fields.items()
        if require_all
        or (f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
    ]
    missing = [name for name in required if name not in data]
    if missing:
        raise ValueError(f"{cls.__name__} is missing required key(s): {', '.join(missing)}.")
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # an annotation that cannot be resolved: leave the checks to the class
        hints = {}
    for name, value in data.items():
        if name in hints and _accepts(hints[name], value) is False:
            raise ValueError(
                f"{cls.__name__}.{name} must be {_expected(hints[name])}, got {value!r} "
                f"({type(value).__name__})."
            )
    return cls(**data)
