"""Building config dataclasses from dicts (their JSON form) with errors a person can act on.

Every config in the package (`CodebookConfig`, `TrainConfig`, `FSMConfig`, ...) loads through
`dataclass_from_dict`, so a typo'd or missing key reads the same everywhere.
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any, TypeVar

T = TypeVar("T")


def dataclass_from_dict(cls: type[T], data: dict[str, Any], require_all: bool = False) -> T:
    """`cls(**data)`, refusing unknown keys (with close matches) and missing required keys.

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
    return cls(**data)
