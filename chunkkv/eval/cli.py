"""``chunkkv-eval COMMAND [options]``: the evaluation tools of chunkkv (``pip install "chunkkv[eval]"``).

Each command is one module of :mod:`chunkkv.eval`; ``chunkkv-eval COMMAND --help`` lists its options.
Results go to JSON files (resumed when they exist); ``report`` turns them into Markdown tables.
"""
from __future__ import annotations

import importlib
import sys
from typing import Optional, Sequence

#: command -> what it does (the module chunkkv.eval.<command> is imported only when run)
COMMANDS = {
    "niah": "needle in a haystack: a sentence hidden at several depths of several context lengths",
    "ruler": "RULER-style synthetic tasks: pass key, single/multi-key NIAH, variable tracking",
    "longbench": "LongBench (v1) and LongBench-E: the 21 tasks with LongBench's prompts and metrics",
    "gsm8k": "GSM8K with k-shot chain-of-thought prompts, scored by the final number",
    "fidelity": "how close compressed-cache outputs stay to the full cache (logits, attention outputs)",
    "speed": "kernel and end-to-end timings (select + gather, prefill, decode, KV memory)",
    "report": "rewrite BENCHMARKS.md's tables from the JSON results",
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: chunkkv-eval COMMAND [options]", "", (__doc__ or "").strip().split("\n\n")[1], "",
             "commands:"]
    lines += [f"  {name:<{width}}  {what}" for name, what in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run ``chunkkv-eval`` with argv (default: the command line); returns the exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    command = args[0]
    if command not in COMMANDS:
        print(f"chunkkv-eval: unknown command {command!r}; expected one of {', '.join(COMMANDS)}\n\n{usage()}",
              file=sys.stderr)
        return 2
    try:
        module = importlib.import_module(f"chunkkv.eval.{command}")
    except ModuleNotFoundError as e:  # the eval extra is missing (torch, transformers, ...)
        if e.name and e.name.split(".")[0] in ("torch", "transformers", "tokenizers", "tqdm", "matplotlib", "gguf"):
            print(f"chunkkv-eval {command}: needs the package {e.name.split('.')[0]!r}; "
                  'install the eval extra: pip install "chunkkv[eval]"', file=sys.stderr)
            return 2
        raise
    status = module.main(args[1:])
    return int(status or 0)


if __name__ == "__main__":
    sys.exit(main())
