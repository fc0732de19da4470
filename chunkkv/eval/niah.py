#!/usr/bin/env python3
"""Needle in a haystack: a sentence hidden at several depths of contexts of several lengths.

The haystack is the .txt files of --haystack (default: $CHUNKKV_SHARED/data/niah/PaulGrahamEssays, or
../shared beside a source checkout, when present, else a repeated filler sentence: no files needed), cut
to each context length; the needle is inserted at each depth (a fraction of the haystack, moved back to a
sentence end), the question asked after it (in the chat template when the tokenizer has one), and the start
of the answer given.
Score: the fraction of the needle's key phrases (--keywords) in the greedy answer, x100.

--limit N keeps the first N (length, depth) cells. Writes the results JSON (resumable), one heatmap per
method and budget (depth x length) under plots/ beside it, and prints tables (rows method x budget,
columns context lengths or depths).

    chunkkv-eval niah --lengths 1024,2048,4096,8192 --depths 0,25,50,75,100 \\
        --methods full,chunkkv,chunkkv:reuse=2,snapkv --budgets 64,128,256,0.1
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import harness as C
from . import metrics as M

SCRIPT = "niah"
NEEDLE = "The best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day."
QUESTION = "What is the best thing to do in San Francisco?"
ANSWER_PREFIX = "The best thing to do in San Francisco is"
KEYWORDS = "eat a sandwich,Dolores Park,sunny day"


def user_prompt(context: str, question: str) -> str:
    return (f"Below is a long text. One sentence in it answers a question.\n\n{context}\n\n"
            f"Question: {question} Answer with the sentence from the text, nothing else.")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="chunkkv-eval niah", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--haystack", default=None,
                   help="folder of .txt files (default: $CHUNKKV_SHARED/data/niah/PaulGrahamEssays if present, else a "
                        "generated filler); 'filler' forces the filler")
    p.add_argument("--lengths", default="1024,2048,4096,8192",
                   help="context lengths in prompt tokens (capped at the model window minus the answer)")
    p.add_argument("--depths", default="0,25,50,75,100", help="needle depths in percent of the haystack")
    p.add_argument("--needle", default=NEEDLE)
    p.add_argument("--question", default=QUESTION)
    p.add_argument("--answer-prefix", default=ANSWER_PREFIX, help="start of the answer ('' for none)")
    p.add_argument("--keywords", default=KEYWORDS, help="comma list of key phrases scored in the answer")
    p.add_argument("--max-new-tokens", type=int, default=24)
    C.add_common_args(p, budgets="64,128,256,0.1", out=str(C.RESULTS_DIR / "niah.json"))
    p.set_defaults(limit=None)
    args = p.parse_args(argv)
    return args


def cells(args) -> list[tuple[int, int]]:
    lengths = [int(x) for x in args.lengths.split(",") if x.strip()]
    depths = [int(x) for x in args.depths.split(",") if x.strip()]
    # deepest needle first: consecutive prompts then share the longest beginning
    grid = [(L, d) for L in lengths for d in sorted(depths, reverse=True)]
    return grid[: args.limit] if args.limit else grid


def heatmaps(results: dict, folder: Path, model: str) -> list[Path]:
    """One PNG per (method, budget), ``niah_<model>_<method>_<budget>.png`` (the model in the name so runs of two
    models can share a folder; a path names its last part): depth (rows) x context length (columns), score 0-100."""
    model = C.model_label(model)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[tuple[str, str], dict[tuple[int, int], float]] = {}
    for e in results.values():
        groups.setdefault((e["method"], e["budget"]), {})[(e["depth"], e["length"])] = 100 * e["score"]
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for (method, budget), vals in sorted(groups.items()):
        depths = sorted({d for d, _ in vals})
        lengths = sorted({L for _, L in vals})
        grid = [[vals.get((d, L), float("nan")) for L in lengths] for d in depths]
        # wide enough for the title even with one context length
        fig, ax = plt.subplots(figsize=(max(1.2 + 1.1 * len(lengths), 3.8), 1.0 + 0.55 * len(depths)))
        im = ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=100, aspect="auto")
        ax.set_xticks(range(len(lengths)), [str(L) for L in lengths])
        ax.set_yticks(range(len(depths)), [f"{d}%" for d in depths])
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("needle depth")
        for i, row in enumerate(grid):
            for j, v in enumerate(row):
                if v == v:
                    ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=8)
        title = f"NIAH {model}: {method}" + ("" if budget == C.NO_BUDGET else f" @ {budget}")
        ax.set_title(title, fontsize=10)
        fig.colorbar(im, ax=ax, fraction=0.05)
        fig.tight_layout()
        name = C.safe_name(model, method) if budget == C.NO_BUDGET else C.safe_name(model, method, budget)
        path = folder / f"niah_{name}.png"
        fig.savefig(path, dpi=80)
        plt.close(fig)
        paths.append(path)
    return paths


def summarize(results: dict) -> list[tuple[str, list[str], list[list]]]:
    """Tables for the report: mean score per context length, and per depth."""
    h1, r1 = C.summary_table(results, ["length"], scale=100)
    h2, r2 = C.summary_table(results, ["depth"], scale=100)
    return [("score by context length (mean over depths)", h1, r1),
            ("score by needle depth % (mean over lengths)", h2, r2)]


def main(argv=None) -> int:
    args = parse_args(argv)
    specs = C.parse_methods(args.methods)
    budgets = C.parse_budgets(args.budgets)
    keywords = [k.strip() for k in args.keywords.split(",") if k.strip()]
    folder = args.haystack
    if folder is None:
        found = C.default_shared("data", "niah", "PaulGrahamEssays")
        folder = str(found) if found else None
    elif folder == "filler":
        folder = None
    config = C.common_config(args) | {"lengths": args.lengths, "depths": args.depths, "needle": args.needle,
                                      "question": args.question, "answer_prefix": args.answer_prefix,
                                      "keywords": keywords, "haystack": folder or "filler",
                                      "max_new_tokens": args.max_new_tokens}
    store = C.ResultStore(args.out, SCRIPT, config, strict=("model", "needle", "haystack"))
    grid = cells(args)
    plan = [(L, d, spec, b) for L, d in grid for spec, b in C.runs(specs, budgets)]
    keys = [C.make_key(spec.label, C.budget_label(b), L, d) for L, d, spec, b in plan]
    todo = set(store.pending(keys))
    print(f"niah: {len(keys)} runs, {store.skipped} already in {args.out}, {len(todo)} to run", flush=True)
    if todo:
        C.setup(args)
        model, tok = C.load(args.model, args.attn)
        chat = not args.no_chat_template
        window = C.model_window(model)
        hay = C.Haystack(tok, C.haystack_text(folder, 8 * max(L for L, _ in grid) + 4000))
        engine = C.engine_from_args(model, tok, args)

        def make_ids(context: str) -> list[int]:
            return C.encode_prompt(tok, user_prompt(context, args.question), answer_prefix=args.answer_prefix,
                                   chat=chat)

        bar = C.tqdm(total=len(todo), desc="niah", disable=args.quiet)
        for L, d in grid:
            cell_jobs = []
            for spec, b in C.runs(specs, budgets):
                key = C.make_key(spec.label, C.budget_label(b), L, d)
                if key in todo:
                    cell_jobs.append((key, spec, b))
            if not cell_jobs:
                continue
            target = min(L, window - args.max_new_tokens)
            ids = C.fit_prompt(hay, make_ids, target, [(d / 100.0, args.needle)])
            jobs = [C.Job(key, ids, spec, b, args.max_new_tokens, stop=("\n",)) for key, spec, b in cell_jobs]
            outs = engine.run(jobs, desc=f"{L}/{d}%")
            for job in jobs:
                out = outs[job.key]
                entry = C.base_entry(job, out) | {"length": L, "depth": d,
                                                  "score": M.keyword_recall(out.text, keywords)}
                store.put(job.key, entry)
            store.save()
            bar.update(len(jobs))
        bar.close()
    store.save()
    results = store.results
    paths = heatmaps(results, C.plots_dir(args.out), args.model)
    for title, headers, rows in summarize(results):
        print(f"\nNIAH ({args.model}), {title}:")
        print(C.format_table(headers, rows))
    print(f"\n{len(paths)} heatmaps in {C.plots_dir(args.out)}; results in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
