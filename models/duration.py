"""Durations as policies write them (``15d``, ``12h``, ``30m``, ``45s``, ``-3d``), and reading
the TOML files they are written in."""

from __future__ import annotations

import re
import tomllib
from datetime import timedelta
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any

from pydantic import BeforeValidator, PlainSerializer

_DURATION = re.compile(r"^(-?)(\d+)([dhms])$")
_UNITS = {"d": "days", "h": "hours", "m": "minutes", "s": "seconds"}


def read_toml(path: Path, what: str, error: type[ValueError]) -> dict[str, Any]:
    """A TOML file operators edit (policies, rates), or ``error`` saying what is wrong with it."""
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise error(f"{what} {path} does not exist") from None
    except OSError as exc:  # a directory (an empty setting reads as "."), no permission
        raise error(f"{what} {path} cannot be read: {exc.strerror or exc.__class__.__name__}") from None
    except tomllib.TOMLDecodeError as exc:
        raise error(f"{what} {path} is not valid TOML: {exc}") from None


@lru_cache(maxsize=1024)  # the same few texts are read for every run and every delivery
def parse_offset(text: str) -> timedelta:
    """``"15d"`` -> 15 days; ``"-3d"`` is three days before the due date. Units: d, h, m, s."""
    match = _DURATION.match(text.strip()) if isinstance(text, str) else None
    if match is None:
        raise ValueError(f"{text!r} is not a duration like 15d, 12h, 30m, 45s or -3d")
    sign, number, unit = match.groups()
    offset = timedelta(**{_UNITS[unit]: int(number)})
    return -offset if sign else offset


@lru_cache(maxsize=1024)
def format_offset(offset: timedelta) -> str:
    """The inverse of :func:`parse_offset`, in the largest whole unit."""
    seconds = int(offset.total_seconds())
    sign = "-" if seconds < 0 else ""
    seconds = abs(seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds and seconds % size == 0:
            return f"{sign}{seconds // size}{unit}"
    return f"{sign}{seconds}s"


def _coerce_offset(value: Any) -> Any:
    return parse_offset(value) if isinstance(value, str) else value


# A timedelta written and shown as "15d" (in the file, in workflow histories, in the UI).
Offset = Annotated[
    timedelta, BeforeValidator(_coerce_offset), PlainSerializer(format_offset, return_type=str)
]
