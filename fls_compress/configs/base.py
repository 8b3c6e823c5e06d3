"""Typed, frozen, validated configuration objects: one per compression method, plus the run options.

Every knob is declared once, with :func:`knob`, on the config class whose handler reads it: its default,
its help text, its range or choices and its CLI panel live in that one declaration. The CLI generates
its options from these declarations (``cli/options.py``), job specs serialise them with
:meth:`Config.to_dict` / :meth:`Config.from_dict`, and validation runs in ``__post_init__`` so an
invalid config cannot exist. Unknown keys are rejected (as pydantic's ``extra="forbid"``).
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, ClassVar

from ..errors import InvalidOptionError


def knob(
    default: Any,
    help: str,
    *,
    min: float | None = None,
    max: float | None = None,
    min_open: bool = False,
    max_open: bool = False,
    choices: tuple[str, ...] | None = None,
    flag: str | None = None,
    short: str | None = None,
) -> Any:
    """A config field with its CLI/validation metadata: range ``[min, max]`` (ends open with ``min_open``/``max_open``)."""
    meta = {"help": help, "min": min, "max": max, "min_open": min_open, "max_open": max_open, "choices": choices, "flag": flag, "short": short}
    if isinstance(default, (list, dict, set)):
        raise TypeError("use tuples for sequence defaults (configs are frozen)")
    return field(default=default, metadata=meta)


def _base_type(tp: Any) -> tuple[Any, bool]:
    """(inner type, optional) for ``X | None`` annotations."""
    args = typing.get_args(tp)
    if args and type(None) in args:
        inner = [a for a in args if a is not type(None)]
        return inner[0], True
    return tp, False


@dataclass(frozen=True)
class Config:
    """Base of every config: validation from field metadata, dict round-trip, unknown keys refused."""

    #: CLI help panel for this class's own knobs
    panel: ClassVar[str] = "Options"

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in fields(self):
            self._check_field(f, hints[f.name])
        self.validate()

    def validate(self) -> None:
        """Cross-field checks (subclasses extend)."""

    # ------------------------------------------------------------------ field checks
    def _check_field(self, f: dataclasses.Field, tp: Any) -> None:
        value = getattr(self, f.name)
        inner, optional = _base_type(tp)
        flag = option_flag(f)
        if value is None:
            if not optional:
                raise InvalidOptionError(f"{flag} is required")
            return
        if inner is bool:
            if not isinstance(value, bool):
                raise InvalidOptionError(f"{flag} must be true or false, got {value!r}")
            return
        if inner is int:
            if isinstance(value, bool) or not isinstance(value, int):
                if isinstance(value, float) and value.is_integer():
                    object.__setattr__(self, f.name, int(value))
                    value = int(value)
                else:
                    raise InvalidOptionError(f"{flag} must be an integer, got {value!r}")
        elif inner is float:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise InvalidOptionError(f"{flag} must be a number, got {value!r}")
            if not math.isfinite(float(value)):
                raise InvalidOptionError(f"{flag} must be a finite number, got {value!r}")
            object.__setattr__(self, f.name, float(value))
            value = float(value)
        elif inner is str:
            if not isinstance(value, str):
                raise InvalidOptionError(f"{flag} must be a string, got {value!r}")
        elif typing.get_origin(inner) is tuple:
            if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
                object.__setattr__(self, f.name, tuple(value))
            else:
                raise InvalidOptionError(f"{flag} must be a list of strings, got {value!r}")
            return
        meta = f.metadata
        if meta.get("choices") and value not in meta["choices"]:
            raise InvalidOptionError(f"{flag} must be one of {', '.join(meta['choices'])}; got {value!r}")
        lo, hi = meta.get("min"), meta.get("max")
        if lo is not None and (value < lo or (meta.get("min_open") and value == lo)):
            op = ">" if meta.get("min_open") else ">="
            raise InvalidOptionError(f"{flag} must be {op} {lo}, got {value}")
        if hi is not None and (value > hi or (meta.get("max_open") and value == hi)):
            op = "<" if meta.get("max_open") else "<="
            raise InvalidOptionError(f"{flag} must be {op} {hi}, got {value}")

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/YAML-able dict; ``from_dict`` of it gives an equal config."""
        out: dict[str, Any] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            out[f.name] = list(v) if isinstance(v, tuple) else v
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Config":
        """Build from a dict; unknown keys are an error (names the valid ones)."""
        if not isinstance(data, dict):
            raise InvalidOptionError(f"{cls.__name__} must be a mapping, got {type(data).__name__}")
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise InvalidOptionError(
                f"unknown key(s) for {cls.__name__}: {', '.join(unknown)}; valid keys: {', '.join(sorted(names))}"
            )
        return cls(**data)

    def replace(self, **changes: Any) -> "Config":
        return dataclasses.replace(self, **changes)

    @classmethod
    def knobs(cls) -> list[dataclasses.Field]:
        return [f for f in fields(cls) if f.init]

    @classmethod
    def default_of(cls, name: str) -> Any:
        f = next(f for f in fields(cls) if f.name == name)
        return None if f.default is MISSING else f.default


def option_flag(f: dataclasses.Field) -> str:
    """The CLI flag of a config field (``fit_steps`` -> ``--fit-steps``)."""
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")
