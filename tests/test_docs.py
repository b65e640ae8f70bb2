"""The docs are held to the code: every command has help and a section in docs/cli.md."""

from __future__ import annotations

import re
from pathlib import Path

import click
import pytest

from edge_agent.entry import SUBCOMMANDS, main

ROOT = Path(__file__).resolve().parent.parent
CLI_DOC = ROOT / "docs" / "cli.md"


def walk(group: click.Command, prefix: str) -> list[tuple[str, click.Command]]:
    out = [(prefix, group)]
    if isinstance(group, click.Group):
        ctx = click.Context(group)
        for name in group.list_commands(ctx):
            out += walk(group.get_command(ctx, name), f"{prefix} {name}")
    return out


def all_commands() -> list[tuple[str, click.Command]]:
    return walk(main, "edgefleet")


def test_every_command_has_help_text():
    missing = [path for path, cmd in all_commands() if not (cmd.help or cmd.short_help)]
    assert not missing, f"commands without help text: {missing}"


def test_every_command_is_documented_in_cli_md():
    headings = set(re.findall(r"^#{2,4} (edgefleet[\w -]*?)\s*$", CLI_DOC.read_text(), re.M))
    missing = [path for path, _ in all_commands() if path != "edgefleet" and path not in headings]
    assert not missing, f"commands missing a heading in docs/cli.md: {missing}"


def test_every_option_is_documented_in_cli_md():
    text = CLI_DOC.read_text()
    missing = []
    for path, cmd in all_commands():
        for param in cmd.params:
            documented = any(opt in text for opt in param.opts)
            if isinstance(param, click.Option) and not param.hidden and not documented:
                missing.append(f"{path} {param.opts[0]}")
    assert not missing, f"options missing from docs/cli.md: {missing}"


@pytest.mark.parametrize("name", sorted(SUBCOMMANDS))
def test_root_help_needs_no_import(name):
    # The root help lists every group from a static table: a device lacks most extras.
    assert SUBCOMMANDS[name][2]


def test_readme_links_exist():
    text = (ROOT / "README.md").read_text()
    links = re.findall(r"\]\(([^)#]+)\)", text)
    missing = [link for link in links if not (ROOT / link).exists()]
    assert not missing, f"README links to missing files: {missing}"
    assert "make demo" in text and "make test" in text
