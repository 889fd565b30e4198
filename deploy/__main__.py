"""``python -m deploy STEP ...``: the same as ``popri deploy STEP ...``."""

from __future__ import annotations

import sys

from deploy.cli import main

sys.exit(main())
