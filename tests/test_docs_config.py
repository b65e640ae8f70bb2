"""The operator docs are held to the code: every config and scenario key is documented, every page
is reachable, every relative link resolves."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from edge_agent.config import all_keys
from firmware_sim.scenario import Drift, Fault, Scenario
from fleet_server.config import ServerConfig

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.glob("*.md"))
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)|!\[[^\]]*\]\(([^)\s]+)\)")


def section(text: str, heading: str) -> str:
    """The text under `heading` up to the next heading of the same or a higher level."""
    level = len(heading) - len(heading.lstrip("#"))
    start = text.index(heading + "\n")
    rest = text[start + len(heading) + 1:]
    end = re.search(rf"^#{{1,{level}}} ", rest, re.M)
    return rest[: end.start()] if end else rest


def table_keys(text: str) -> set[str]:
    """Keys named in the first column of markdown tables (`| \\`key\\`, \\`other\\` | ...`)."""
    keys: set[str] = set()
    for line in text.splitlines():
        if line.startswith("| `"):
            keys |= set(re.findall(r"`([^`]+)`", line.split("|")[1]))
    return keys


def test_every_agent_config_key_is_in_the_device_reference_table():
    # tests/test_agent_config.py checks that each key is mentioned; here it must be a table row.
    documented = table_keys(section((DOCS / "device.md").read_text(), "## Configuration reference"))
    missing = [key for key in all_keys() if key not in documented]
    assert not missing, f"agent config keys missing from docs/device.md's reference table: {missing}"


def test_every_server_config_key_is_in_the_fleet_server_reference_table():
    documented = table_keys(section((DOCS / "fleet-server.md").read_text(), "## Configuration"))
    keys = [f.name for f in dataclasses.fields(ServerConfig) if f.name != "data_dir"]
    missing = [key for key in keys if key not in documented]
    assert not missing, f"server.toml keys missing from docs/fleet-server.md's configuration table: {missing}"
    unknown = sorted(documented - set(keys))
    assert not unknown, f"docs/fleet-server.md documents keys the server does not have: {unknown}"


@pytest.mark.parametrize("cls,heading", [
    (Scenario, "## Scenario files"),
    (Drift, "`[[drift]]` tables"),
    (Fault, "`[[fault]]` tables"),
])
def test_every_scenario_key_is_documented(cls, heading):
    text = section((DOCS / "simulation.md").read_text(), "## Scenario files")
    if cls is not Scenario:  # the drift and fault tables follow their own lead-in line
        text = text[text.index(heading):]
        text = text[: text.index("\n\n", text.index("| key |"))]
    else:
        text = text[: text.index("`[[drift]]` tables")]
    documented = table_keys(text)
    # `drifts` and `faults` are the [[drift]] and [[fault]] tables of the file
    keys = [f.name for f in dataclasses.fields(cls) if f.name not in ("drifts", "faults")]
    missing = [key for key in keys if key not in documented]
    assert not missing, f"{cls.__name__} keys missing from docs/simulation.md ({heading}): {missing}"


def links(path: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)  # code blocks hold no links
    return [a or b for a, b in LINK.findall(text)]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    return {slug(h) for h in re.findall(r"^#{1,6} (.+?)\s*$", text, re.M)}


@pytest.mark.parametrize("page", [ROOT / "README.md", *PAGES], ids=lambda p: p.name)
def test_relative_links_resolve(page):
    broken = []
    for target in links(page):
        if re.match(r"[a-z]+:", target):
            continue  # http(s), mailto: not checked here
        file_part, _, anchor = target.partition("#")
        dest = (page.parent / file_part).resolve() if file_part else page
        if not dest.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target} (no heading #{anchor})")
    assert not broken, f"broken links in {page.relative_to(ROOT)}: {broken}"


def test_no_orphan_pages():
    linked: set[Path] = set()
    for page in [ROOT / "README.md", *PAGES]:
        for target in links(page):
            file_part = target.partition("#")[0]
            if file_part and not re.match(r"[a-z]+:", file_part):
                dest = (page.parent / file_part).resolve()
                if dest != page.resolve():
                    linked.add(dest)
    orphans = [p.name for p in PAGES if p.resolve() not in linked]
    assert not orphans, f"docs pages linked from neither README.md nor another page: {orphans}"


def test_every_image_is_used():
    used = {(DOCS / t).resolve() for p in PAGES for t in links(p) if t.startswith("img/")}
    unused = [p.name for p in sorted((DOCS / "img").glob("*")) if p.resolve() not in used]
    assert not unused, f"images in docs/img that no page shows: {unused}"
