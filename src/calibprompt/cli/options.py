"""Command-line flags generated from the config schema, so that each default exists once.

A run config (:class:`~calibprompt.runs.PromptRunConfig`, :class:`~calibprompt.runs.TPTRunConfig`)
declares every field with its default and help text (:func:`calibprompt.runs.common.option`);
:func:`add_config_options` turns the fields into flags (``n_ctx`` -> ``--n-ctx``; a ``bool``
that defaults to False -> a switch; ``bool | None`` -> ``--x / --no-x``) whose help shows the
default, and :func:`config_from_args` builds the config back from the parsed namespace. Flags of
commands without a config take their defaults from the library function they call
(:func:`default_of`).
"""

from __future__ import annotations

import argparse
import inspect
import types
import typing
from collections.abc import Callable, Iterable
from dataclasses import MISSING, fields
from typing import Any

__all__ = ["add_config_options", "config_from_args", "default_of", "help_with_default"]


def help_with_default(text: str, default: Any) -> str:
    """``text`` with ``(default: …)`` appended, escaped for argparse's %-formatting."""
    shown = "none" if default is None else default
    return f"{text} (default: {shown})".replace("%", "%%")


def default_of(function: Callable[..., Any], name: str) -> Any:
    """The default of parameter ``name`` of ``function`` (the one place where it is written)."""
    return inspect.signature(function).parameters[name].default


def _base_type(hint: Any) -> tuple[type, bool]:
    """(the non-None type of a field, whether None is allowed)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0], True
    return hint, False


def add_config_options(parser: argparse.ArgumentParser, config_class: type,
                       exclude: Iterable[str] = (), required: Iterable[str] = ()) -> None:
    """Add one flag per field of ``config_class`` (except ``exclude`` and fields declared with
    ``cli=False``); fields without a default are required flags."""
    hints = typing.get_type_hints(config_class)
    skip = set(exclude)
    for f in fields(config_class):
        meta = f.metadata
        if f.name in skip or meta.get("cli", True) is False:
            continue
        flag = "--" + f.name.replace("_", "-")
        kind, optional = _base_type(hints[f.name])
        kwargs: dict[str, Any] = {"dest": f.name}
        if "choices" in meta:
            kwargs["choices"] = list(meta["choices"])
        if "metavar" in meta:
            kwargs["metavar"] = meta["metavar"]
        text = meta.get("help", "")
        if f.default is MISSING:
            parser.add_argument(flag, required=True, help=text.replace("%", "%%"),
                                type=kind, **kwargs)
            continue
        shown = meta.get("default_text", f.default)
        if kind is bool and not optional:
            parser.add_argument(flag, action="store_true", default=f.default,
                                help=help_with_default(text, "off" if not f.default else "on"), **kwargs)
        elif kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default,
                                help=help_with_default(text, shown), **kwargs)
        elif typing.get_origin(kind) is tuple:  # tuple[float, ...]: one or more values, the flag repeatable
            parser.add_argument(flag, type=typing.get_args(kind)[0], nargs="+", action="extend", default=f.default,
                                help=help_with_default(text, shown), **kwargs)
        else:
            parser.add_argument(flag, type=kind, default=f.default, help=help_with_default(text, shown),
                                required=f.name in set(required), **kwargs)


def config_from_args(config_class: type, args: argparse.Namespace, **fixed: Any) -> Any:
    """The config of the parsed flags: every field that has a flag, ``progress`` from ``--quiet``,
    and ``fixed`` values (e.g. the method of ``zeroshot``)."""
    values = {f.name: getattr(args, f.name) for f in fields(config_class) if hasattr(args, f.name)}
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}  # nargs="+" fields
    if hasattr(args, "quiet"):
        values["progress"] = not args.quiet
    return config_class(**{**values, **fixed})
