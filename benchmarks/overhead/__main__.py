"""``python -m benchmarks.overhead``: the same as ``python -m benchmarks overhead``."""

import sys

from .command import main

sys.exit(main(sys.argv[1:]))
