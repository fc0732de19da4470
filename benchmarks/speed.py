#!/usr/bin/env python3
"""`chunkkv-eval speed` from the installed chunkkv (chunkkv/eval/speed.py): `python benchmarks/speed.py --help`."""
import sys

from chunkkv.eval.speed import main

if __name__ == "__main__":
    sys.exit(main())
