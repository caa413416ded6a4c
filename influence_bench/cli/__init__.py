"""The ``influence-bench`` command line (``main``): one module per command group."""

try:
    from influence_bench.cli.main import main
except KeyboardInterrupt:  # Ctrl-C while torch is still importing: one line and 130, as `main` ends it
    import sys

    print("influence-bench: interrupted", file=sys.stderr)
    raise SystemExit(130) from None

__all__ = ["main"]
