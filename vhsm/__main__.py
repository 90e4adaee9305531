"""`python -m vhsm` runs the command line."""

import sys

from vhsm.cli import main

sys.exit(main())
