"""Turning pydantic's validation errors into the one-line reasons users see."""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import ValidationError


def reason(loc: Sequence[str | int], msg: str) -> str:
    """``customer.email: value is not a valid email address``: the field, then what is wrong,
    once (a check whose message names its field already is not prefixed again)."""
    where = ".".join(str(p) for p in loc) or "input"
    message = msg.removeprefix("Value error, ")
    last = str(loc[-1]) if loc else where
    if message.startswith((f"{where} ", f"{where}:")):
        return message
    if message.startswith((f"{last} ", f"{last}:")):
        return where + message[len(last):]
    return f"{where}: {message}"


# What a date or a date-time looks like, said after pydantic's words for one it could not read
# ("invalid character in year" does not say what it wanted).
FORMATS = {"date": "a date like 2026-12-01", "datetime": "a date-time like 2026-12-01T09:00:00+01:00"}


def describe(error: ValidationError) -> str:
    """``customer.email: value is not a valid email address; currency: unknown currency 'ZZZ'``."""
    return "; ".join(reason(item["loc"], item["msg"] + _expected(item["type"])) for item in error.errors())


def _expected(kind: str) -> str:
    for name, looks in FORMATS.items():
        if kind.startswith((f"{name}_parsing", f"{name}_from_", f"{name}_type")):
            return f" (give {looks})"
    return ""
