#!/usr/bin/env python3
"""`chunkkv-eval ruler` from the installed chunkkv (chunkkv/eval/ruler.py): `python benchmarks/ruler.py --help`."""
import sys

from chunkkv.eval.ruler import main

if __name__ == "__main__":
    sys.exit(main())
