"""``python -m benchmark.perf ...`` is ``popri perf ...``."""

import sys

from benchmark.perf.cli import run

sys.exit(run())
