"""Free text from people (reasons, notes, names, payment ids): what may be stored.

PostgreSQL refuses a NUL character in any text column, and a refused write of a run's records is
retried for as long as the run lives, so NUL never reaches the database: the edges (CLI, client,
API) refuse control characters in what people type, naming the field, and the ledger drops NUL
from anything that came another way (a raw signal from a script).
"""

from __future__ import annotations

import re

# C0 controls and DEL, except tab and line breaks, which a note may hold.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def has_control(value: str) -> bool:
    """Whether ``value`` holds a control character other than a tab or a line break."""
    return _CONTROL.search(value) is not None


def control_problem(field: str, value: str) -> str | None:
    """Why ``value`` cannot be stored as ``field``, or None."""
    return f"{field}: must not contain control characters" if has_control(value) else None


def storable(text: str) -> str:
    """``text`` without NUL, which PostgreSQL cannot store."""
    return text.replace("\x00", "")
