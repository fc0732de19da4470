#!/usr/bin/env python3
"""`chunkkv-eval longbench` from the installed chunkkv (chunkkv/eval/longbench.py): `python benchmarks/longbench.py --help`."""
import sys

from chunkkv.eval.longbench import main

if __name__ == "__main__":
    sys.exit(main())
