#!/usr/bin/env python3
"""`chunkkv-eval report` from the installed chunkkv (chunkkv/eval/report.py): `python benchmarks/report.py --help`."""
import sys

from chunkkv.eval.report import main

if __name__ == "__main__":
    sys.exit(main())
