"""Backend-neutral pieces of queries: JSON columns, and WHERE clauses of optional filters."""

from __future__ import annotations

from typing import Any

import msgspec

_json = msgspec.json.Encoder()


def dumps(value: Any) -> str:
    return _json.encode(value).decode()


def loads(text: str | None) -> Any:
    return None if text is None else msgspec.json.decode(text)


def decode(rows: list[dict[str, Any]], *columns: str) -> list[dict[str, Any]]:
    """Decode the JSON `columns` of each row in place; returns the rows."""
    for r in rows:
        for k in columns:
            r[k] = loads(r[k])
    return rows


def where(*terms: tuple[str, Any]) -> tuple[str, list[Any]]:
    """The WHERE clause of a query's optional filters and its parameters: (" WHERE a AND b", [...]),
    ("", []) when none applies. A term is (condition, value): None or False leaves it out, True
    keeps a condition without a placeholder, a list or tuple fills one placeholder per item, any
    other value one. The conditions carry the backend's placeholders."""
    conditions: list[str] = []
    params: list[Any] = []
    for condition, value in terms:
        if value is None or value is False:
            continue
        conditions.append(condition)
        if isinstance(value, (list, tuple)):
            params += value
        elif value is not True:
            params.append(value)
    return (" WHERE " + " AND ".join(conditions) if conditions else ""), params
