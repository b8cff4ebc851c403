"""`python -m netkernel` is the `netkernel` command."""

import sys

from .cli import main

sys.exit(main())
