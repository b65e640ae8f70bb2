"""Reading a TOML configuration file: the one error type, the file's table, its unknown keys.

The agent's `agent.toml` and the fleet server's `server.toml` are both read here; the module
imports nothing but the standard library, so a device holds it without any server code.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Collection, Iterable
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A configuration file or value that cannot work: missing, not TOML, a wrong key or value;
    the message says which and what to do."""


def read_toml(path: str | os.PathLike[str], *, required: bool = True) -> dict[str, Any]:
    """The file's top-level table; {} for a missing file unless it is `required`."""
    path = Path(path)
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        if not required:
            return {}
        raise ConfigError(f"configuration file {path} does not exist") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from exc


def field_names(cls: type, exclude: Iterable[str] = ()) -> set[str]:
    """The keys a dataclass takes from a table."""
    return {f.name for f in dataclasses.fields(cls)} - set(exclude)


def unknown_keys(table: dict[str, Any], known: Collection[str]) -> list[str]:
    """The table's keys that are not `known`, in the file's order (a typo must not fall back to a
    default silently)."""
    return [key for key in table if key not in known]
