"""``python -m falqon_lit``: the ``falqon`` CLI."""

import sys

from falqon_lit.cli import main

sys.exit(main())
