"""``python -m influence_bench``: the ``influence-bench`` command line."""

import sys

from influence_bench.cli import main

if __name__ == "__main__":
    sys.exit(main())
