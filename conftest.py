"""Root conftest: lets ``pytest suites/`` work from a checkout even before ``pip install -e .``
(the installed package registers the plugin through the ``pytest11`` entry point)."""

import sys
from importlib import metadata
from pathlib import Path

_installed = any(ep.value == "influence_bench.pytest_plugin" for ep in metadata.entry_points(group="pytest11"))
if not _installed:
    sys.path.insert(0, str(Path(__file__).parent))
    pytest_plugins = ["influence_bench.pytest_plugin"]
