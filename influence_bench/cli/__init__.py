"""The ``influence-bench`` command line (``main``): one module per command group."""

from influence_bench.cli.main import main

__all__ = ["main"]
