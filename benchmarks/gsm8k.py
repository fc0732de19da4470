#!/usr/bin/env python3
"""`chunkkv-eval gsm8k` from the installed chunkkv (chunkkv/eval/gsm8k.py): `python benchmarks/gsm8k.py --help`."""
import sys

from chunkkv.eval.gsm8k import main

if __name__ == "__main__":
    sys.exit(main())
