"""Dataclass <-> plain-data conversion with type checks: the one mechanism behind the
recipe loader (strict: unknown keys are errors with a did-you-mean) and the records
(JSON files the store writes and reads back)."""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any, Union

from .errors import UsageError


@dataclasses.dataclass(frozen=True)
class Range:
    """The valid values of a number field (or of each item of a list field); `nonempty` for lists."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False  # lo itself is not allowed
    hi_open: bool = False
    nonempty: bool = False

    def problem(self, value: Any) -> str:
        if isinstance(value, (list, tuple)):
            if self.nonempty and not value:
                return "is empty"
            return next((p for p in map(self.problem, value) if p), "")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return ""
        low = self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo)
        high = self.hi is not None and (value >= self.hi if self.hi_open else value > self.hi)
        return f"{value!r} is out of range" if low or high else ""

    def describe(self) -> str:
        lo = "" if self.lo is None else f"{'>' if self.lo_open else '≥'} {self.lo:g}"
        hi = "" if self.hi is None else f"{'<' if self.hi_open else '≤'} {self.hi:g}"
        return " and ".join(p for p in (lo, hi) if p)


def ranged(default: Any = dataclasses.MISSING, *, factory: Any = dataclasses.MISSING, **limits: Any) -> Any:
    """A dataclass field whose values `from_plain` checks against `Range(**limits)`."""
    return dataclasses.field(default=default, default_factory=factory, metadata={"range": Range(**limits)})


def to_plain(obj: Any) -> Any:
    """A dataclass tree as JSON-ready lists, dicts and scalars (tuples become lists)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): to_plain(v) for k, v in obj.items()}
    return obj


def from_plain(cls: type, data: Any, where: str = "", *, strict: bool = True) -> Any:
    """Build dataclass `cls` from plain data, checking keys and types.

    `where` names the place for error messages ("vepatch.yaml: apply"). With
    `strict=False`, unknown keys are dropped (records written by newer versions).
    """
    return _coerce(data, cls, where or cls.__name__, strict)


def _coerce(value: Any, tp: Any, where: str, strict: bool) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin is typing.Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"use one of: {', '.join(map(str, choices))}"
            raise UsageError(f"{_at(where)} '{value}' is not one of {', '.join(map(str, choices))}", hint)
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where, strict)
            except UsageError as exc:
                errors.append(exc)
        raise errors[0] if errors else _type_error(where, tp, value)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise _type_error(where, "a mapping", value)
        hints = typing.get_type_hints(tp)
        fields = {f.name: f for f in dataclasses.fields(tp) if f.init}
        names = list(fields)
        kwargs = {}
        for key, item in value.items():
            if key not in names:
                if not strict:
                    continue
                close = difflib.get_close_matches(str(key), names, n=1)
                hint = f"did you mean '{close[0]}'?" if close else f"known keys: {', '.join(names)}"
                raise UsageError(f"{_at(where)} unknown key '{key}'", hint)
            kwargs[key] = _coerce(item, hints[key], _child(where, key), strict)
            limits = fields[key].metadata.get("range")
            problem = limits.problem(kwargs[key]) if limits else ""
            if problem:
                raise UsageError(f"{_child(where, key)}: {problem}",
                                 "give at least one value" if problem == "is empty" else f"use a value {limits.describe()}")
        try:
            return tp(**kwargs)
        except TypeError as exc:  # a required field is missing
            raise UsageError(f"{_at(where)} {exc}", "add the missing key") from None
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise _type_error(where, "a list", value)
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        items = [_coerce(v, item_tp, f"{where}[{i}]", strict) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise _type_error(where, "a mapping", value)
        key_tp, val_tp = typing.get_args(tp) or (Any, Any)
        return {
            _coerce(k, key_tp, where, strict): _coerce(v, val_tp, _child(where, str(k)), strict)
            for k, v in value.items()
        }
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _type_error(where, "a number", value)
        return float(value)
    if tp is int:
        if isinstance(value, float) and value.is_integer() and not strict:  # records written as 16.0
            return int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise _type_error(where, "a whole number", value)
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise _type_error(where, "true or false", value)
        return value
    if tp is str:
        if not isinstance(value, str):
            raise _type_error(where, "a string", value)
        return value
    if isinstance(tp, type) and not isinstance(value, tp):
        raise _type_error(where, tp.__name__, value)
    return value


def _at(where: str) -> str:
    """The place as a message prefix: 'recipe.yaml: apply.shots:' (never two colons)."""
    return where if where.endswith(":") else where + ":"


def _child(where: str, key: str) -> str:
    """'recipe.yaml:' + 'apply' -> 'recipe.yaml: apply'; 'recipe.yaml: apply' + 'shots' -> '... apply.shots'."""
    return f"{where} {key}" if where.endswith(":") else f"{where}.{key}"


def _type_error(where: str, expected: Any, value: Any) -> UsageError:
    expected = expected if isinstance(expected, str) else getattr(expected, "__name__", str(expected))
    return UsageError(f"{_at(where)} expected {expected}, got {value!r}", "fix the value's type")
