"""``python -m popri.cli``: the ``popri`` command."""

import sys

from popri.cli import main

if __name__ == "__main__":  # pytest --doctest-modules imports this module too
    sys.exit(main())
