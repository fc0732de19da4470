"""``python -m chunkkv.eval``: the same as the ``chunkkv-eval`` command."""
import sys

from .cli import main

sys.exit(main())
