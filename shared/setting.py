"""A config dataclass field that also describes its command-line flag: one source for default and help."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

_BYTE_UNITS = {"kib": 1024, "mib": 1024**2, "gib": 1024**3, "kb": 1000, "mb": 1000**2, "gb": 1000**3, "b": 1}


def setting(
    default: Any = dataclasses.MISSING,
    *,
    help: str,
    flag: str | None = None,
    choices: Sequence[str] | None = None,
    parse: Callable[[str], Any] | None = None,
    default_text: str | None = None,
    metavar: str | None = None,
    many: bool = False,
) -> Any:
    """A dataclass field whose `metadata` says how the `pagewire` CLI exposes it.

    `flag` defaults to `--field-name`; `parse` converts the flag's text (default: from the field's
    type); `default_text` replaces the default in `--help` when the value alone says nothing (None).
    A field without a default becomes a required flag. A `tuple[X, ...]` field's flag may be repeated;
    with `many` it also takes several values at once (`--flag a b`).
    """
    metadata = {"help": help, "flag": flag, "choices": tuple(choices) if choices else None, "parse": parse,
                "default_text": default_text, "metavar": metavar, "many": many}
    return dataclasses.field(default=default, metadata=metadata)


def parse_bytes(text: str) -> int:
    """'512MiB', '2GiB', '1e9' or a plain integer of bytes."""
    lowered = text.strip().lower()
    for suffix, factor in _BYTE_UNITS.items():
        if lowered.endswith(suffix):
            return int(float(lowered[: -len(suffix)]) * factor)
    return int(float(lowered))
