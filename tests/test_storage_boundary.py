"""Storage stays behind its package: outside `fleet_server/storage/` no fleet_server module imports a
database driver or holds SQL. Read from the AST: every import (also inside functions) and every
string literal, f-string parts included."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "fleet_server"
STORAGE = PACKAGE / "storage"
DRIVERS = {"sqlite3", "sqlite_utils", "psycopg", "psycopg_pool", "psycopg2", "asyncpg"}
SQL = re.compile(
    r"\bSELECT\b[\s\S]*\bFROM\b|\bINSERT\s+(?:OR\s+\w+\s+)?INTO\b|\bUPDATE\s+\w+\s+SET\b|\bDELETE\s+FROM\b"
    r"|\bCREATE\s+(?:UNIQUE\s+)?(?:TABLE|INDEX)\b|\bALTER\s+TABLE\b|\bDROP\s+TABLE\b|\bPRAGMA\b"
    r"|\bBEGIN\s+IMMEDIATE\b"
)


def violations(source: str) -> list[str]:
    """What in one module's source crosses the storage boundary, one line each."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [node.module or ""] if not node.level else []
        else:
            names = []
        for name in names:
            if name.split(".")[0] in DRIVERS:
                found.append((node.lineno, f"imports {name}"))
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and SQL.search(node.value):
            found.append((node.lineno, f"SQL {node.value.strip()[:60]!r}"))
    return [f"line {n}: {what}" for n, what in sorted(found)]


def test_the_checker_sees_drivers_and_sql():
    source = (
        "import sqlite3\n"
        "def f(conn, n):\n"
        "    from psycopg import sql\n"
        "    conn.execute(f'SELECT id FROM devices WHERE n = {n}')\n"
        "    conn.execute('INSERT OR REPLACE INTO meta(key) VALUES (?)')\n"
        "    conn.execute('update devices set x = 1')\n"  # lower case: prose, not flagged
        "    return 'PRAGMA busy_timeout=1'\n"
    )
    assert [v.split(":")[0] for v in violations(source)] == ["line 1", "line 3", "line 4", "line 5", "line 7"]
    assert violations("'''Select what you need from the list.'''\n") == []


def test_no_driver_or_sql_outside_the_storage_package():
    modules = [p for p in sorted(PACKAGE.rglob("*.py")) if not p.is_relative_to(STORAGE)]
    assert len(modules) > 20
    found = {
        str(path.relative_to(ROOT)): v for path in modules if (v := violations(path.read_text()))
    }
    assert not found, "move these behind a Storage method (fleet_server/storage/):\n" + "\n".join(
        f"{path}: {line}" for path, lines in found.items() for line in lines
    )
