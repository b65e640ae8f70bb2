"""Device group queries: which devices a saved group holds, by their tags (hawkBit's target filters).

A query is FIQL-like: conditions joined by `;` (and) form a clause, clauses joined by `,` (or).
A condition is `key==value`, `key!=value`, `key=in=(a,b)` or `key=out=(a,b)`; a value may hold
`*` wildcards (`key==*`: the tag is set). The key `id` is the device id, every other key a tag.
`!=` and `=out=` also hold for devices without the tag. Pure: no storage, no I/O.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from fnmatch import fnmatchcase
from functools import lru_cache

OPERATORS = ("==", "!=", "=in=", "=out=")
_CONDITION = re.compile(r"^\s*([A-Za-z0-9_.:/-]+)\s*(==|!=|=in=|=out=)\s*(.+?)\s*$")
_VALUE = re.compile(r"^[^;,()=!\s][^;,()=!]*$")
MAX_QUERY_CHARS = 2000


class GroupQueryError(ValueError):
    """A query that cannot be read; the message says where and what is allowed."""

    status = 400


@dataclass(frozen=True)
class Condition:
    key: str
    op: str
    values: tuple[str, ...]

    def holds(self, device_id: str, tags: dict[str, str]) -> bool:
        actual = device_id if self.key == "id" else tags.get(self.key)
        hit = actual is not None and any(fnmatchcase(actual, v) for v in self.values)
        return hit if self.op in ("==", "=in=") else not hit


@dataclass(frozen=True)
class GroupQuery:
    text: str
    clauses: tuple[tuple[Condition, ...], ...]  # or of ands

    def matches(self, device_id: str, tags: dict[str, str]) -> bool:
        return any(all(c.holds(device_id, tags) for c in clause) for clause in self.clauses)


def _split_top(text: str, sep: str) -> list[str]:
    """Split on `sep` outside parentheses (the lists of =in= / =out=)."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth < 0:
                raise GroupQueryError(f"unbalanced ')' at character {i + 1} of {text!r}")
        elif ch == sep and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth:
        raise GroupQueryError(f"unbalanced '(' in {text!r}")
    parts.append(text[start:])
    return parts


def _condition(text: str) -> Condition:
    m = _CONDITION.match(text)
    if not m:
        raise GroupQueryError(
            f"cannot read the condition {text.strip()!r}: write key==value, key!=value, "
            "key=in=(a,b) or key=out=(a,b)"
        )
    key, op, raw = m.groups()
    if op in ("=in=", "=out="):
        if not (raw.startswith("(") and raw.endswith(")")):
            raise GroupQueryError(f"{key}{op} takes a list in parentheses, e.g. {key}{op}(a,b)")
        values = tuple(v.strip() for v in raw[1:-1].split(","))
    else:
        values = (raw,)
    for v in values:
        if not _VALUE.match(v):
            raise GroupQueryError(
                f"{key}{op}: the value {v!r} is empty or holds one of ; , ( ) = ! which a query cannot quote"
            )
    return Condition(key, op, values)


@lru_cache(maxsize=1024)
def parse_query(text: str) -> GroupQuery:
    """Read a query (cached: rollouts and groups match every device on every reconcile pass)."""
    if not isinstance(text, str) or not text.strip():
        raise GroupQueryError("a device group needs a query, e.g. site==madrid;hw=in=(pi4,pi5)")
    if len(text) > MAX_QUERY_CHARS:
        raise GroupQueryError(f"a query has at most {MAX_QUERY_CHARS} characters")
    clauses = tuple(
        tuple(_condition(cond) for cond in _split_top(clause, ";"))
        for clause in _split_top(text, ",")
    )
    return GroupQuery(text.strip(), clauses)
