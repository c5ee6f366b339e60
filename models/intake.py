"""Reading invoices from files: a JSON object, a JSON array, JSON Lines, or CSV.

Each record keeps its position (``file:row``) so a rejected one can be reported precisely. CSV
columns use dots for the customer's fields (``customer.email``); empty cells are left out.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Record:
    source: str
    row: int
    data: dict[str, Any] | None
    error: str | None = None

    @property
    def where(self) -> str:
        return f"{self.source} row {self.row}"


def read_records(text: str, source: str) -> list[Record]:
    """Parse ``text`` by its shape; ``.csv`` names and text not starting with '{' or '[' are CSV."""
    stripped = text.lstrip()
    if source.endswith(".csv") or (stripped and stripped[0] not in "{["):
        return _csv(text, source)
    if stripped.startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as exc:
            return [Record(source, 1, None, f"not valid JSON: {exc}")]
        return [_record(source, n, item) for n, item in enumerate(items, start=1)]
    try:
        return [_record(source, 1, json.loads(text))]
    except json.JSONDecodeError:
        pass
    records = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(_record(source, n, json.loads(line)))
        except json.JSONDecodeError as exc:
            records.append(Record(source, n, None, f"not valid JSON: {exc.msg}"))
    return records


def _record(source: str, row: int, item: Any) -> Record:
    if not isinstance(item, dict):
        return Record(source, row, None, "expected a JSON object for an invoice")
    return Record(source, row, item)


def _csv(text: str, source: str) -> list[Record]:
    reader = csv.DictReader(io.StringIO(text))
    records = []
    for n, row in enumerate(reader, start=2):  # row 1 is the header
        if None in row:
            records.append(Record(source, n, None, "more cells than header columns"))
            continue
        data: dict[str, Any] = {}
        for column, value in row.items():
            if value is None or value.strip() == "":
                continue
            target = data
            *parents, leaf = column.strip().split(".")
            for parent in parents:
                target = target.setdefault(parent, {})
            target[leaf] = value.strip()
        records.append(Record(source, n, data))
    return records
