"""`python -m moekern.e2e ...`: the same runner and flags as `moekern e2e ...`."""

import sys

from moekern.e2e.cli import main

sys.exit(main())
