"""argparse options made from the declarations of settings (hdb.config, hdb.options), for the command line
(hdb.cli) and the app (hdb.app.main): each option's flag (`hdb.terms.flag_for`), default, type, range, choices and
help are its field's, and `config_from_args` builds the dataclass back from the parsed options."""

from __future__ import annotations

import argparse
from dataclasses import MISSING, fields
from types import NoneType, UnionType
from typing import Any, get_args, get_origin, get_type_hints

from hdb.config import shown_value, value_problem
from hdb.terms import NOT_ON_THE_COMMAND_LINE, flag_for


def config_option(parser: argparse._ActionsContainer, config: type, name: str, unset: str = "", **kwargs: Any) -> None:
    """Add the option for field `name` of the `config` dataclass: its flag (`hdb.terms.flag_for`), and the field's
    default, type, help and choices. `unset`: the option defaults to None instead, which the command resolves as this
    says ("the hypernetwork's"). `kwargs` go to argparse as they are (e.g. nargs), but for `help` (this command's
    words for it) and `default` (where the app reads it from its environment: a switch's flag is still the one that
    sets the value away from the field's default)."""
    field = {f.name: f for f in fields(config)}[name]
    flag = flag_for(name)
    if unset:
        default = None
    elif field.default_factory is not MISSING:
        default = field.default_factory()
    else:  # a field the library requires has None: whether a command requires its option is the command's business
        default = None if field.default is MISSING else field.default
    help = kwargs.pop("help", field.metadata["help"])
    help = f"{help} (default: {unset})" if unset else help
    if "choices" in field.metadata:
        kwargs.setdefault("choices", field.metadata["choices"])
    if isinstance(default, bool):  # a flag sets the value away from the default
        kwargs["action"] = "store_false" if default else "store_true"
        help = f"do not {help}" if default else help
    else:
        kind = _value_type(config, name)
        if isinstance(default, list):
            kwargs.setdefault("nargs", "+")
        kwargs.setdefault("type", kind)
        if "between" in field.metadata:  # checked as it is parsed: a bad value stops before any model loads
            kwargs["type"] = in_range(kwargs["type"], field.metadata["between"], field.metadata.get("multiple_of"))
        shown_default = " ".join(map(str, default)) if isinstance(default, list) else default
        notes = [f"default {shown_default}"] if default is not None else []
        if "const" in kwargs:  # nargs="?": the flag alone means `const`
            notes.append(f"{flag} alone: {kwargs['const']}")
        help = f"{help} ({'; '.join(notes)})" if notes else help
    default = kwargs.pop("default", default)
    parser.add_argument(flag, dest=name, default=default, help=help, **kwargs)


def config_options(
    parser: argparse.ArgumentParser, config: type, leave_out: tuple[str, ...] = (), **kwargs_of: dict[str, Any]
) -> None:
    """Add an option for each field of `config` that has a default, but those no command offers
    (`hdb.terms.NOT_ON_THE_COMMAND_LINE`) and those this command does not (`leave_out`). `kwargs_of[name]`: more
    argparse arguments for field `name`'s option (`config_option`)."""
    for field in fields(config):
        has_default = field.default is not MISSING or field.default_factory is not MISSING
        if has_default and field.name not in NOT_ON_THE_COMMAND_LINE and field.name not in leave_out:
            config_option(parser, config, field.name, **kwargs_of.get(field.name, {}))


def _value_type(config: type, name: str) -> type:
    """The type an option's value is parsed as: the field's, `int` for `int | None` and for `list[int]`."""
    hint = get_type_hints(config)[name]
    if isinstance(hint, UnionType):
        return next(t for t in get_args(hint) if t is not NoneType)
    if get_origin(hint) is list:
        return get_args(hint)[0]
    return hint


def in_range(kind: type, between: tuple[float, float], multiple_of: int | None = None) -> Any:
    """An argparse type: `kind` (int or float) parsed and checked against `between` (hdb.config.value_problem)."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{shown_value(text)} is not {'a whole number' if kind is int else 'a number'}"
            ) from None
        problem = value_problem(value, between, kind is int, multiple_of)
        if problem:
            raise argparse.ArgumentTypeError(problem)
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


def config_from_args(config: type, args: argparse.Namespace, **overrides: Any) -> Any:
    """The `config` dataclass holding every parsed option that is one of its fields."""
    values = {f.name: getattr(args, f.name) for f in fields(config) if hasattr(args, f.name)}
    return config(**{**values, **overrides})
