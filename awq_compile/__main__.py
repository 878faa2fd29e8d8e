"""`python -m awq_compile ...` runs the `awq-compile` command line."""

import sys

from .cli import main

sys.exit(main())
