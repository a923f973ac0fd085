"""`python -m condiff.cli ...` (what `accelerate launch -m condiff.cli` runs): the command line."""

import sys

from condiff.cli import main

sys.exit(main())
