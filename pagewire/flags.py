"""Command-line flags generated from config dataclasses (fields made with `shared.setting.setting`).

The dataclass is the one source of every setting's default, help text and choices; this module only
translates: fields -> argparse flags, parsed flags -> the dataclass, a dataclass -> flags for a child.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Collection
from typing import Any, TypeVar

C = TypeVar("C")

_TYPES: dict[str, Any] = {"int": int, "float": float, "str": str}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows `(default: ...)` after every flag's help, unless the help already says its default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        if "(default:" in help_text or action.required:
            return help_text
        return super()._get_help_string(action)


def flag_fields(config_class: type, skip: Collection[str] = ()) -> list[dataclasses.Field]:
    """The fields of `config_class` that are flags: those with help metadata, minus `skip`."""
    return [f for f in dataclasses.fields(config_class) if "help" in f.metadata and f.name not in skip]


def flag_name(field: dataclasses.Field) -> str:
    return field.metadata.get("flag") or "--" + field.name.replace("_", "-")


def _is_repeatable(field: dataclasses.Field) -> bool:
    type_name = str(field.type).replace(" ", "")
    return type_name.startswith("tuple[") and type_name.endswith(",...]")


def _parser_type(field: dataclasses.Field) -> Any:
    if field.metadata.get("parse") is not None:
        return field.metadata["parse"]
    type_name = str(field.type).replace(" ", "").removesuffix("|None")
    if _is_repeatable(field):
        type_name = type_name.removeprefix("tuple[").removesuffix(",...]")
    if type_name not in _TYPES:
        raise TypeError(f"{field.name}: give setting(parse=...) for a field of type {field.type}")
    return _TYPES[type_name]


def add_config_flags(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup, config_class: type, skip: Collection[str] = ()
) -> None:
    """Adds one flag per field of `config_class` (bools as --x/--no-x); its dest is the field name."""
    for field in flag_fields(config_class, skip):
        meta = field.metadata
        help_text = meta["help"].replace("%", "%%")
        if meta.get("default_text"):
            help_text += f" (default: {meta['default_text']})"
        kwargs: dict[str, Any] = {"dest": field.name, "help": help_text}
        if field.default is dataclasses.MISSING:
            kwargs["required"] = True
        else:
            kwargs["default"] = field.default
        if str(field.type) == "bool":
            parser.add_argument(flag_name(field), action=argparse.BooleanOptionalAction, **kwargs)
            continue
        if _is_repeatable(field):
            # tuple[X, ...]: the flag may be given many times, each adding one element (or, with
            # `many`, several).
            kwargs["action"] = "extend" if meta.get("many") else "append"
            if meta.get("many"):
                kwargs["nargs"] = "+"
            if "default" in kwargs:
                kwargs["default"] = None
        kwargs["type"] = _parser_type(field)
        if meta.get("choices"):
            kwargs["choices"] = meta["choices"]
        else:
            kwargs["metavar"] = meta.get("metavar") or flag_name(field).removeprefix("--").replace("-",
                "_").upper()
        parser.add_argument(flag_name(field), **kwargs)


def config_from_args(config_class: type[C], args: argparse.Namespace, skip: Collection[str] = (),
    **values: Any) -> C:
    """`config_class` from the parsed flags of its fields (minus `skip`), plus `values` given here."""
    from_flags = {f.name: getattr(args, f.name) for f in flag_fields(config_class,
        skip) if f.name not in values}
    for field in flag_fields(config_class, skip):
        if _is_repeatable(field) and field.name in from_flags:
            given = from_flags[field.name]
            if given is None:
                del from_flags[field.name]
            else:
                from_flags[field.name] = tuple(given)
    return config_class(**from_flags, **values)


def config_to_argv(config: object, skip: Collection[str] = ()) -> list[str]:
    """The flags that give a process `config` again (fields equal to their default are left out)."""
    argv: list[str] = []
    for field in flag_fields(type(config), skip):
        value = getattr(config, field.name)
        if field.default is not dataclasses.MISSING and value == field.default:
            continue
        if value is None:
            continue
        if isinstance(value, bool):
            argv.append(flag_name(field) if value else "--no-" + flag_name(field).removeprefix("--"))
        elif isinstance(value, tuple):
            for element in value:
                argv += [flag_name(field), str(element)]
        else:
            argv += [flag_name(field), str(value)]
    return argv
