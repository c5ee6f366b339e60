"""Turning pydantic's validation errors into the one-line reasons users see."""

from __future__ import annotations

from pydantic import ValidationError


def describe(error: ValidationError) -> str:
    """``customer.email: value is not a valid email address; currency: unknown currency 'ZZZ'``."""
    parts = []
    for item in error.errors():
        where = ".".join(str(p) for p in item["loc"]) or "input"
        message = item["msg"].removeprefix("Value error, ")
        parts.append(f"{where}: {message}")
    return "; ".join(parts)
