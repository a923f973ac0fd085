"""`python -m condiff`: the command line."""

import sys

from condiff.cli import main

sys.exit(main())
