"""`python -m hasten ...` is the `hasten` command."""

import sys

from .commands import main

sys.exit(main())
