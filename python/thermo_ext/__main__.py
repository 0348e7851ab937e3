"""``python -m thermo_ext``: the ``thermo-ext`` command line (see :mod:`thermo_ext.cli`)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
