"""`python -m alignkit` is the `alignkit` command."""

import sys

from .cli import main

sys.exit(main())
