#!/usr/bin/env python3
"""RULER-style synthetic long-context tasks, generated in code (no data files needed).

Tasks (after Hsieh et al., 2024, "RULER: What's the real context size of your long-context LMs?"):

* ``passkey``    -- a 5-digit pass key hidden in repeated filler sentences; "What is the pass key?"
* ``niah_single``  -- one "special magic number for <key>" (7 digits) hidden in the essay haystack.
* ``niah_multikey`` -- four such needles with different keys; the question names one of them.
* ``vt``         -- variable tracking: ``VAR A = 12345``, then ``VAR B = VAR A`` ... (one chain, four hops)
  spread through filler; "find all variables that are assigned the value 12345".

Every sample is drawn from a generator seeded by (--seed, task, length, index); needles are placed at
sentence boundaries at random depths. The prompt is the chat template (when the tokenizer has one) with
the start of the answer given, as in RULER. Score: RULER's string match -- the fraction of expected
strings found in the greedy answer (1/0 for the single-value tasks), x100.

    chunkkv-eval ruler --lengths 4096 --limit 5 --methods full,chunkkv,snapkv --budgets 0.1

RULER's own pre-generated files instead (``--data FILE``, repeatable): jsonl records with ``index``, ``input``,
``outputs`` (the reference strings) and ``length`` (and optionally ``answer_prefix``, appended after the
generation prompt). The task is the file's name (``niah_single_1.jsonl``) or its folder's
(``niah_single_1/validation.jsonl``, RULER's layout), or ``--task``. Each task gets RULER's generation length
(:data:`RULER_TASKS`: 128 tokens for the NIAH tasks, 30 vt, 120 cwe, 50 fwe, 32 qa), no stop string (only the
model's end tokens), and RULER's metric: ``string_match_all`` (mean over the references of whether each
appears in the prediction, case-insensitive) or, for qa, ``string_match_part`` (whether any appears).

    chunkkv-eval ruler --data ruler/4096/niah_single_1.jsonl --data ruler/4096/vt.jsonl --limit 20
"""
from __future__ import annotations

import argparse
import random
import string
import sys
from pathlib import Path

from . import harness as C
from . import metrics as M

SCRIPT = "ruler"
TASKS = ("passkey", "niah_single", "niah_multikey", "vt")
MAX_NEW = {"passkey": 12, "niah_single": 16, "niah_multikey": 16, "vt": 40}
#: RULER's task families for --data files: (task name prefix, tokens to generate, metric), from RULER's
#: synthetic task constants (niah, variable_tracking, common/freq words extraction, qa)
RULER_TASKS: tuple[tuple[str, int, str], ...] = (
    ("niah", 128, "string_match_all"),
    ("vt", 30, "string_match_all"),
    ("cwe", 120, "string_match_all"),
    ("fwe", 50, "string_match_all"),
    ("qa", 32, "string_match_part"),
)
METRICS = {"string_match_all": M.string_match_all, "string_match_part": M.string_match_part}


def ruler_task_config(task: str) -> tuple[int, str]:
    """(tokens to generate, metric name) of a RULER task (niah_single_1, niah_multikey_3, vt, cwe, fwe, qa_2, ...)."""
    for prefix, max_new, metric in RULER_TASKS:
        if task == prefix or task.startswith(prefix + "_"):
            return max_new, metric
    raise SystemExit(f"chunkkv-eval ruler: unknown RULER task {task!r}; expected a name starting with one of "
                     f"{', '.join(p for p, _, _ in RULER_TASKS)} (give it with --task)")


def data_task_name(path: str, explicit: str | None = None) -> str:
    """The RULER task of a data file: --task, else the file's name, else its folder's (RULER's layout
    <task>/validation.jsonl)."""
    if explicit:
        return explicit
    p = Path(path)
    for name in (p.stem, p.parent.name):
        if any(name == pre or name.startswith(pre + "_") for pre, _, _ in RULER_TASKS):
            return name
    raise SystemExit(f"chunkkv-eval ruler: cannot tell the RULER task of {path} from its name or folder; "
                     "give --task NAME (e.g. niah_single_1, vt, qa_1)")


def read_data(path: str) -> list[dict]:
    """RULER records of a jsonl file, checked for the fields scoring needs."""
    rows = C.read_records(path)
    for n, row in enumerate(rows):
        missing = [k for k in ("index", "input", "outputs") if k not in row]
        if missing or not isinstance(row.get("outputs"), list):
            raise SystemExit(f"chunkkv-eval ruler: {path} record {n} lacks {missing or ['outputs as a list']}; "
                             "expected RULER's fields index, input, outputs, length")
    return rows


def score_prediction(task: str, prediction: str, outputs: list) -> float:
    """RULER's score (0..1) of one prediction for a task."""
    return METRICS[ruler_task_config(task)[1]](prediction, [str(o) for o in outputs])
ADJECTIVES = ("amber quiet brave calm eager fancy gentle happy icy jolly kind lively merry nimble proud rapid "
              "silent tidy vivid witty bold bright clever cosmic dusty early faint golden hollow ivory lunar "
              "misty noble olive polar rustic scarlet solid tender urban velvet wild young").split()
NOUNS = ("anchor badge canyon dolphin engine falcon garden harbor island jacket kettle lantern meadow needle "
         "orchard pepper quarry river saddle tunnel umbrella valley walnut yacht zebra beacon cactus desert "
         "ember forest glacier hammer insect jungle kayak ladder mirror nectar oyster pillow").split()


def make_sample(task: str, length: int, index: int, seed: int, hay_essays: C.Haystack, hay_noise: C.Haystack,
                tokenizer, chat: bool, target: int) -> tuple[list[int], list[str]]:
    """(prompt ids, expected strings) of one sample."""
    rng = random.Random(f"{seed}/{task}/{length}/{index}")
    if task == "passkey":
        key = str(rng.randint(10000, 99999))
        needle = f"The pass key is {key}. Remember it. {key} is the pass key."
        intro = ("There is an important piece of information hidden inside a lot of irrelevant text. Find it and "
                 "memorize it. I will quiz you about it.")
        question, prefix, expected, hay = "What is the pass key?", "The pass key is", [key], hay_noise
        needles = [(rng.random(), needle)]
    elif task in ("niah_single", "niah_multikey"):
        n_keys = 1 if task == "niah_single" else 4
        words = set()
        while len(words) < n_keys:
            words.add(f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}")
        words = sorted(words)
        rng.shuffle(words)
        values = [str(rng.randint(1000000, 9999999)) for _ in words]
        needles = [(rng.random(), f"One of the special magic numbers for {w} is: {v}.") for w, v in zip(words, values)]
        key, value = words[0], values[0]
        intro = ("Some special magic numbers are hidden within the following text. Make sure to memorize them. "
                 "I will quiz you about the numbers afterwards.")
        question = f"What is the special magic number for {key} mentioned in the provided text?"
        prefix = f"The special magic number for {key} mentioned in the provided text is"
        expected, hay = [value], hay_essays
    elif task == "vt":
        value = str(rng.randint(10000, 99999))
        names = set()
        while len(names) < 5:
            names.add("".join(rng.choice(string.ascii_uppercase) for _ in range(5)))
        names = sorted(names)  # a set's order follows the string hash seed, which differs per process
        rng.shuffle(names)
        lines = [f"VAR {names[0]} = {value}."] + [f"VAR {names[i]} = VAR {names[i - 1]}." for i in range(1, 5)]
        depths = sorted(rng.random() for _ in lines)
        needles = list(zip(depths, lines))
        intro = "Memorize and track the chain(s) of variable assignment hidden in the following text."
        question = f"Find all variables that are assigned the value {value} in the text above."
        prefix = (f"According to the chain(s) of variable assignment in the text above, 5 variables are assigned "
                  f"the value {value}, they are:")
        expected, hay = names, hay_noise
    else:
        raise ValueError(task)

    def make_ids(context: str) -> list[int]:
        user = f"{intro}\n\n{context}\n\n{question}"
        return C.encode_prompt(tokenizer, user, answer_prefix=prefix, chat=chat)

    return C.fit_prompt(hay, make_ids, target, needles), expected


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="chunkkv-eval ruler", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", default=",".join(TASKS), help=f"comma list of {', '.join(TASKS)}")
    p.add_argument("--lengths", default="4096", help="prompt lengths in tokens (capped at the model window)")
    p.add_argument("--haystack", default=None,
                   help="essay folder for the niah tasks (default $CHUNKKV_SHARED/data/niah/PaulGrahamEssays if "
                        "present, else the filler)")
    p.add_argument("--data", action="append", default=None, metavar="FILE",
                   help="RULER pre-generated jsonl (index, input, outputs, length); repeatable; replaces the "
                        "generated tasks (--tasks, --lengths, --haystack are then unused)")
    p.add_argument("--task", default=None, help="the RULER task of --data (default: from the file or folder name)")
    C.add_common_args(p, budgets="0.1,0.2", out=str(C.RESULTS_DIR / "ruler.json"), limit=5)
    args = p.parse_args(argv)
    if args.task and args.data and len(args.data) > 1:
        p.error("--task names the task of a single --data file")
    for t in args.tasks.split(","):
        if t not in TASKS:
            p.error(f"--tasks: unknown task {t!r}")
    return args


def summarize(results: dict) -> list[tuple[str, list[str], list[list]]]:
    h, r = C.summary_table(results, ["length", "task"], scale=100)
    return [("score by length/task (string match, %)", h, r)]


def main_data(args: argparse.Namespace) -> int:
    """Run and score RULER's pre-generated files (--data)."""
    specs = C.parse_methods(args.methods)
    budgets = C.parse_budgets(args.budgets)
    files = []
    for path in args.data:
        task = data_task_name(path, args.task)
        ruler_task_config(task)
        rows = read_data(path)
        files.append((path, task, rows[: args.limit] if args.limit else rows))
    config = C.common_config(args) | {"data": list(args.data), "tasks": ",".join(t for _, t, _ in files),
                                      "haystack": None}
    store = C.ResultStore(args.out, SCRIPT, config, strict=("model", "haystack", "data"))
    plan = []
    for _, task, rows in files:
        for row in rows:
            length = int(row.get("length", 0))
            for spec, b in C.runs(specs, budgets):
                key = C.make_key(task, length, row["index"], spec.label, C.budget_label(b))
                plan.append((key, task, row, spec, b))
    todo = set(store.pending(k for k, *_ in plan))
    print(f"ruler: {len(plan)} runs over {sum(len(r) for *_, r in files)} records of {len(files)} files, "
          f"{store.skipped} already in {args.out}, {len(todo)} to run", flush=True)
    if todo:
        C.setup(args)
        model, tok = C.load(args.model, args.attn)
        chat = not args.no_chat_template
        window = C.model_window(model)
        engine = C.engine_from_args(model, tok, args)
        bar = C.tqdm(total=len(todo), desc="ruler", disable=args.quiet)
        by_record: dict[tuple, list] = {}
        for key, task, row, spec, b in plan:
            if key in todo:
                by_record.setdefault((task, id(row)), []).append((key, row, spec, b))
        for (task, _), runs in by_record.items():
            row = runs[0][1]
            max_new, metric = ruler_task_config(task)
            ids = C.encode_prompt(tok, row["input"], answer_prefix=row.get("answer_prefix") or "", chat=chat)
            if len(ids) + max_new > window:
                print(f"warning: {task} record {row['index']}: {len(ids)} prompt tokens plus {max_new} new tokens "
                      f"exceed the model window ({window})", file=sys.stderr)
            jobs = [C.Job(key, ids, spec, b, max_new) for key, _, spec, b in runs]
            outs = engine.run(jobs, desc=f"{task}/{row['index']}")
            _store_outputs(store, bar, jobs, outs, lambda out: {
                "task": task, "length": int(row.get("length", 0)), "index": row["index"],
                "expected": row["outputs"], "metric": metric,
                "score": score_prediction(task, out.text, row["outputs"])})
        bar.close()
    return _finish(store, f"RULER data ({args.model})")


def _store_outputs(store, bar, jobs, outs, fields) -> None:
    """Record each job's output with the task's fields (fields(out) -> dict), save, advance the bar."""
    for job in jobs:
        out = outs[job.key]
        store.put(job.key, C.base_entry(job, out) | fields(out))
    store.save()
    bar.update(len(jobs))


def _finish(store, title: str) -> int:
    """Save the results and print their summary tables."""
    store.save()
    for table, headers, rows in summarize(store.results):
        print(f"\n{title}, {table}:")
        print(C.format_table(headers, rows))
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.data:
        return main_data(args)
    specs = C.parse_methods(args.methods)
    budgets = C.parse_budgets(args.budgets)
    tasks = [t for t in args.tasks.split(",") if t]
    lengths = [int(x) for x in args.lengths.split(",") if x.strip()]
    folder = args.haystack
    if folder is None:
        found = C.default_shared("data", "niah", "PaulGrahamEssays")
        folder = str(found) if found else None
    config = C.common_config(args) | {"tasks": args.tasks, "lengths": args.lengths, "haystack": folder or "filler"}
    store = C.ResultStore(args.out, SCRIPT, config | {"data": None}, strict=("model", "haystack", "data"))
    plan = []
    for L in lengths:
        for task in tasks:
            for i in range(args.limit):
                for spec, b in C.runs(specs, budgets):
                    plan.append((C.make_key(task, L, i, spec.label, C.budget_label(b)), L, task, i, spec, b))
    todo = set(store.pending(k for k, *_ in plan))
    print(f"ruler: {len(plan)} runs, {store.skipped} already in {args.out}, {len(todo)} to run", flush=True)
    if todo:
        C.setup(args)
        model, tok = C.load(args.model, args.attn)
        chat = not args.no_chat_template
        window = C.model_window(model)
        need = 8 * max(lengths) + 4000
        hay_essays = C.Haystack(tok, C.haystack_text(folder, need))
        hay_noise = C.Haystack(tok, C.haystack_text(None, need))
        engine = C.engine_from_args(model, tok, args)
        bar = C.tqdm(total=len(todo), desc="ruler", disable=args.quiet)
        samples = {}
        for key, L, task, i, spec, b in plan:
            if key in todo:
                samples.setdefault((L, task, i), []).append((key, spec, b))
        for (L, task, i), runs in samples.items():
            target = min(L, window - MAX_NEW[task])
            ids, expected = make_sample(task, L, i, args.seed, hay_essays, hay_noise, tok, chat, target)
            jobs = [C.Job(key, ids, spec, b, MAX_NEW[task], stop=("\n",)) for key, spec, b in runs]
            outs = engine.run(jobs, desc=f"{task}/{L}/{i}")
            _store_outputs(store, bar, jobs, outs, lambda out: {
                "task": task, "length": L, "index": i, "expected": expected,
                "score": M.string_match_all(out.text, expected)})
        bar.close()
    return _finish(store, f"RULER ({args.model})")


if __name__ == "__main__":
    sys.exit(main())
