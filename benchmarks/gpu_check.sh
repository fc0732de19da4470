#!/usr/bin/env bash
# The one-shot GPU check is tools/gpu_check.py (its header says how to run it on a lent GPU machine and what
# each step does); this keeps the old entry point. Arguments pass through, e.g. --dry-run on a machine
# without a GPU.
exec "${PYTHON:-python3}" "$(dirname "$0")/../tools/gpu_check.py" "$@"
