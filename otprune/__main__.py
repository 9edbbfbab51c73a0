"""`python -m otprune ...`: the same command line as `otprune ...`."""

import sys

from otprune.cli import main

sys.exit(main())
