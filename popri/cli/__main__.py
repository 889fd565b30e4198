"""``python -m popri.cli``: the ``popri`` command."""

import sys

from popri.cli import main

sys.exit(main())
