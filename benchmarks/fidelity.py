#!/usr/bin/env python3
"""`chunkkv-eval fidelity` from the installed chunkkv (chunkkv/eval/fidelity.py): `python benchmarks/fidelity.py --help`."""
import sys

from chunkkv.eval.fidelity import main

if __name__ == "__main__":
    sys.exit(main())
