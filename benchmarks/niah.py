#!/usr/bin/env python3
"""`chunkkv-eval niah` from the installed chunkkv (chunkkv/eval/niah.py): `python benchmarks/niah.py --help`."""
import sys

from chunkkv.eval.niah import main

if __name__ == "__main__":
    sys.exit(main())
