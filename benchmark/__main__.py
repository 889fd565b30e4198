"""``python -m benchmark ...`` is ``popri bench ...``."""

import sys

from benchmark.cli import main

sys.exit(main())
