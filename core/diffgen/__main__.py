"""``python -m diffgen`` is the ``diffgen`` command."""

import sys

from .cli import main

sys.exit(main())
