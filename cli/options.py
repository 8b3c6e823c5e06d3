"""Typer options generated from the config classes, so help text, defaults, ranges and choices exist once.

:func:`knob_params` turns every knob of the given config classes into an ``Annotated`` Typer option
(default ``None`` = "not given": the config's own default applies), grouped in help panels by the class
that declares it; each option's help lists the methods that accept it. :func:`split_knobs` sorts the
values a user gave back into one config, refusing options that do not apply to the chosen method.
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from enum import Enum
from typing import Annotated, Any, Callable, Optional

import typer
from rich.markup import escape

from fls_compress.configs import Config, MethodConfig, option_flag
from fls_compress.configs.base import _base_type
from fls_compress.errors import InvalidOptionError


def _declaring_class(cls: type, name: str) -> type:
    for klass in reversed(cls.__mro__):
        if name in klass.__dict__.get("__annotations__", {}):
            return klass
    return cls


def _choice_enum(name: str, choices: tuple[str, ...]) -> type[Enum]:
    return Enum(name, {c.replace("-", "_"): c for c in choices}, type=str)  # type: ignore[return-value]


def _param(f: dataclasses.Field, tp: Any, panel: str, methods: list[str] | None) -> inspect.Parameter:
    inner, _ = _base_type(tp)
    meta = f.metadata
    decls = [option_flag(f)] + ([meta["short"]] if meta.get("short") else [])
    help_text = meta.get("help", "")
    if methods is not None:  # escaped: the app renders help as rich markup, where [fls] would be a style tag
        help_text += " " + escape(f"[{', '.join(methods)}]")
    kwargs: dict[str, Any] = {"help": help_text, "rich_help_panel": panel, "show_default": False}
    if inner is bool:
        flag = option_flag(f)
        decls = [f"{flag}/--no-{flag[2:]}"]
        py_type: Any = Optional[bool]
    elif meta.get("choices"):
        py_type = Optional[_choice_enum(f"{f.name}_choices", meta["choices"])]
    elif typing.get_origin(inner) is tuple:
        py_type = Optional[list[str]]
    else:
        py_type = Optional[inner]
        # Ranges are checked by the config, not by the parser: a value that parses but is out of range
        # then fails after argument parsing, so it still leaves a failure report at --report.
        bounds = _range_text(meta)
        if bounds:
            kwargs["help"] = f"{help_text} " + escape(f"[{bounds}]")
    return inspect.Parameter(
        f.name, inspect.Parameter.KEYWORD_ONLY, default=None,
        annotation=Annotated[py_type, typer.Option(*decls, **kwargs)],
    )


def _range_text(meta: Any) -> str:
    """``x>=1``, ``0<=x<1``... as click prints ranges in the help."""
    lo, hi = meta.get("min"), meta.get("max")
    left = "" if lo is None else f"{lo}{'<' if meta.get('min_open') else '<='}"
    right = "" if hi is None else f"{'<' if meta.get('max_open') else '<='}{hi}"
    if not left and not right:
        return ""
    if not right:
        return f"x{'>' if meta.get('min_open') else '>='}{lo}"
    return f"{left}x{right}"


def knob_params(classes: list[type[Config]], *, list_methods: bool = True) -> list[inspect.Parameter]:
    """One Typer option per distinct knob name across ``classes`` (first declaration wins the help)."""
    seen: dict[str, inspect.Parameter] = {}
    users: dict[str, list[str]] = {}
    decl: dict[str, tuple[dataclasses.Field, Any, str]] = {}
    for cls in classes:
        hints = typing.get_type_hints(cls)
        for f in cls.knobs():
            users.setdefault(f.name, []).append(getattr(cls, "method", "") or cls.__name__)
            if f.name not in decl:
                decl[f.name] = (f, hints[f.name], _declaring_class(cls, f.name).panel)
    for name, (f, tp, panel) in decl.items():
        seen[name] = _param(f, tp, panel, users[name] if list_methods else None)
    return list(seen.values())


def plain(value: Any) -> Any:
    """Enum members and lists from Typer back to config values."""
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, list):
        return tuple(value)
    return value


def split_knobs(config_type: type[MethodConfig], given: dict[str, Any], all_classes: list[type[Config]]) -> MethodConfig:
    """Build ``config_type`` from the knobs the user gave; a knob of another method is an error."""
    allowed = {f.name for f in config_type.knobs()}
    values = {k: plain(v) for k, v in given.items() if v is not None}
    wrong = sorted(set(values) - allowed)
    if wrong:
        owners = {f.name: [c.method for c in all_classes if f.name in {g.name for g in c.knobs()}]
                  for c in all_classes for f in c.knobs()}
        name = wrong[0]
        flag = "--" + name.replace("_", "-")
        raise InvalidOptionError(
            f"{flag} does not apply to -m {config_type.method} (it applies to: {', '.join(owners.get(name, []))})"
        )
    return config_type(**values)


def with_signature(fn: Callable[..., Any], params: list[inspect.Parameter]) -> Callable[..., Any]:
    """Give ``fn(**kwargs)`` the explicit signature Typer reads its options from."""
    fn.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    fn.__annotations__ = {p.name: p.annotation for p in params}
    return fn
