"""``python -m influence_bench.cli``: the command line."""

import sys

from influence_bench.cli.main import main

sys.exit(main())
