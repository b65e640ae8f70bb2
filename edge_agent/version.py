"""The installed edgefleet version, as the agent reports it in `reported.agent_version`.

Read from the first `edgefleet-*.dist-info/METADATA` on sys.path, which is where
importlib.metadata finds it too; importlib.metadata itself imports the `email` package
(~1.4 MiB of a device's RSS) to parse that file.
"""

import os
import sys


def installed_version(name: str = "edgefleet") -> str:
    """The version of the installed distribution `name`, or "0.0.0" (a source tree)."""
    prefix = name.replace("-", "_") + "-"
    for entry in sys.path:
        try:
            names = sorted(os.listdir(entry or "."))
        except OSError:
            continue
        for dist in names:
            if not (dist.startswith(prefix) and dist.endswith(".dist-info")):
                continue
            try:
                with open(os.path.join(entry or ".", dist, "METADATA"), encoding="utf-8") as fh:
                    for line in fh:
                        if line.startswith("Version:"):
                            return line.split(":", 1)[1].strip()
                        if not line.strip():
                            break  # end of the headers
            except OSError:
                continue
    return "0.0.0"


__version__ = installed_version()
