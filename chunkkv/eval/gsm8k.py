#!/usr/bin/env python3
"""GSM8K with k-shot chain-of-thought prompts (few-shot to many-shot), scored by the final number.

The --train file (default $CHUNKKV_SHARED/data/gsm8k/train.jsonl; lines with ``question`` and ``answer``, the
answer ending in ``#### <number>``) is split in two: its last --heldout problems are the evaluation set
(unless --eval-file is given). The worked examples, the same for every question, are by default
(``--shots-source fixed``) the first --shots (at most 8) of the fixed chain-of-thought exemplars of Wei et al.
2022, "Chain-of-Thought Prompting Elicits Reasoning in Large Language Models" (the set lm-evaluation-harness's
``gsm8k-cot`` uses), in the paper's order; ``--shots-source random`` draws --shots (seeded) from the rest of
the train file instead (any number: many-shot). The results file records the source and the shot questions
(config ``shots_source`` and ``shot_questions``). A shot is "Question: ...\\nAnswer: <reasoning> The answer
is <n>." (the calculator annotations <<...>> removed); the prompt is the shots followed by the question, in
the chat template when the tokenizer has one. Greedy decoding stops at the next "Question:"; the prediction is the
last number of the answer; the score is accuracy (x100).

    chunkkv-eval gsm8k --train train.jsonl --shots 8 --limit 100 --budgets 0.1
"""
from __future__ import annotations

import argparse
import random
import re
import sys
from pathlib import Path

from . import harness as C
from . import metrics as M

SCRIPT = "gsm8k"
INSTRUCTION = ("Solve the grade-school math problems. Think step by step and end every answer with "
               "\"The answer is <number>.\"")


#: the 8 chain-of-thought exemplars of Wei et al. 2022 (arXiv:2201.11903, the math word problem prompt),
#: in the paper's order: (question, reasoning, final answer)
COT_EXEMPLARS: tuple[tuple[str, str, str], ...] = (
    ("There are 15 trees in the grove. Grove workers will plant trees in the grove today. After they are done, "
     "there will be 21 trees. How many trees did the grove workers plant today?",
     "There are 15 trees originally. Then there were 21 trees after some more were planted. So there must have "
     "been 21 - 15 = 6.", "6"),
    ("If there are 3 cars in the parking lot and 2 more cars arrive, how many cars are in the parking lot?",
     "There are originally 3 cars. 2 more cars arrive. 3 + 2 = 5.", "5"),
    ("Leah had 32 chocolates and her sister had 42. If they ate 35, how many pieces do they have left in total?",
     "Originally, Leah had 32 chocolates. Her sister had 42. So in total they had 32 + 42 = 74. After eating 35, "
     "they had 74 - 35 = 39.", "39"),
    ("Jason had 20 lollipops. He gave Denny some lollipops. Now Jason has 12 lollipops. How many lollipops did "
     "Jason give to Denny?",
     "Jason started with 20 lollipops. Then he had 12 after giving some to Denny. So he gave Denny 20 - 12 = 8.",
     "8"),
    ("Shawn has five toys. For Christmas, he got two toys each from his mom and dad. How many toys does he have "
     "now?",
     "Shawn started with 5 toys. If he got 2 toys each from his mom and dad, then that is 4 more toys. "
     "5 + 4 = 9.", "9"),
    ("There were nine computers in the server room. Five more computers were installed each day, from monday to "
     "thursday. How many computers are now in the server room?",
     "There were originally 9 computers. For each of 4 days, 5 more computers were added. So 5 * 4 = 20 "
     "computers were added. 9 + 20 is 29.", "29"),
    ("Michael had 58 golf balls. On tuesday, he lost 23 golf balls. On wednesday, he lost 2 more. How many golf "
     "balls did he have at the end of wednesday?",
     "Michael started with 58 golf balls. After losing 23 on tuesday, he had 58 - 23 = 35. After losing 2 more, "
     "he had 35 - 2 = 33 golf balls.", "33"),
    ("Olivia has $23. She bought five bagels for $3 each. How much money does she have left?",
     "Olivia had 23 dollars. 5 bagels for 3 dollars each will be 5 x 3 = 15 dollars. So she has 23 - 15 dollars "
     "left. 23 - 15 is 8.", "8"),
)
SHOT_SOURCES = ("fixed", "random")


def fixed_shots(n: int = len(COT_EXEMPLARS)) -> list[dict]:
    """The first n fixed chain-of-thought exemplars as GSM8K rows (``question``, ``answer`` ending ``#### N``)."""
    if not 0 <= n <= len(COT_EXEMPLARS):
        raise SystemExit(f"chunkkv-eval gsm8k: --shots {n} with --shots-source fixed: there are "
                         f"{len(COT_EXEMPLARS)} fixed exemplars (use --shots-source random for more)")
    return [{"question": q, "answer": f"{r}\n#### {a}"} for q, r, a in COT_EXEMPLARS[:n]]


def read_jsonl(path: str | Path, default_split: str = "train") -> list[dict]:
    """Rows of a .jsonl file, or of hf:NAME[:CONFIG[:SPLIT]] (e.g. hf:openai/gsm8k:main:train)."""
    return C.read_records(path, default_split=default_split)


def clean_solution(answer: str) -> str:
    """The reasoning without calculator annotations, ending with 'The answer is N.'"""
    body, _, final = answer.partition("####")
    body = re.sub(r"<<[^>]*>>", "", body).strip()
    body = " ".join(line.strip() for line in body.splitlines() if line.strip())
    return f"{body} The answer is {final.strip()}."


def build_user(shots: list[dict], question: str) -> str:
    parts = [INSTRUCTION, ""]
    for s in shots:
        parts.append(f"Question: {s['question'].strip()}\nAnswer: {clean_solution(s['answer'])}\n")
    parts.append(f"Question: {question.strip()}")
    return "\n".join(parts)


def split(train: list[dict], heldout: int, shots: int, seed: int) -> tuple[list[dict], list[dict]]:
    """(shots from the first part, the held-aside last `heldout` problems)."""
    if heldout >= len(train):
        raise SystemExit(f"--heldout {heldout}: the train file has only {len(train)} problems")
    pool, held = train[: len(train) - heldout], train[len(train) - heldout:]
    if shots > len(pool):
        raise SystemExit(f"--shots {shots}: only {len(pool)} problems to draw from")
    return random.Random(seed).sample(pool, shots), held


def choose_shots_and_evalset(args: argparse.Namespace) -> tuple[list[dict], list[dict]]:
    """(shots, evaluation set) for --shots-source, --shots, --train, --heldout, --eval-file and --seed."""
    if args.shots_source == "fixed":
        shots = fixed_shots(args.shots)
        if args.eval_file:
            return shots, read_jsonl(args.eval_file, "test")
        train = read_jsonl(args.train)
        return shots, split(train, args.heldout, 0, args.seed)[1]
    train = read_jsonl(args.train)
    if args.eval_file:
        return random.Random(args.seed).sample(train, args.shots), read_jsonl(args.eval_file, "test")
    return split(train, args.heldout, args.shots, args.seed)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="chunkkv-eval gsm8k", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    default = C.default_shared("data", "gsm8k", "train.jsonl")
    p.add_argument("--train", default=str(default) if default else None, required=default is None,
                   help="GSM8K train.jsonl (shots; and evaluation on its held-aside part), or "
                        "hf:openai/gsm8k:main:train with the datasets package, online")
    p.add_argument("--eval-file", default=None, help="evaluate on this jsonl instead of the held-aside part")
    p.add_argument("--heldout", type=int, default=1000, help="size of the held-aside evaluation part (default 1000)")
    p.add_argument("--shots", type=int, default=8, help="worked examples in the prompt (8; 50+ for many-shot, "
                                                        "with --shots-source random)")
    p.add_argument("--shots-source", choices=SHOT_SOURCES, default="fixed",
                   help="fixed: the 8 chain-of-thought exemplars of Wei et al. 2022, in order (default); random: "
                        "drawn (seeded by --seed) from the train file outside the held-aside part")
    p.add_argument("--max-new-tokens", type=int, default=256)
    C.add_common_args(p, budgets="0.1", out=str(C.RESULTS_DIR / "gsm8k.json"), limit=100)
    return p.parse_args(argv)


def summarize(results: dict) -> list[tuple[str, list[str], list[list]]]:
    h, r = C.summary_table(results, ["shots"], scale=100)
    return [("accuracy % by number of shots", h, r)]


def main(argv=None) -> int:
    args = parse_args(argv)
    specs = C.parse_methods(args.methods)
    budgets = C.parse_budgets(args.budgets)
    shots, evalset = choose_shots_and_evalset(args)
    evalset = evalset[: args.limit] if args.limit else evalset
    config = C.common_config(args) | {"train": args.train, "eval_file": args.eval_file, "heldout": args.heldout,
                                      "shots": args.shots, "shots_source": args.shots_source,
                                      "shot_questions": [s["question"] for s in shots],
                                      "max_new_tokens": args.max_new_tokens}
    # files written before --shots-source existed used random shots
    store = C.ResultStore(args.out, SCRIPT, config, strict=("model", "train", "eval_file", "heldout", "shots_source"),
                          old_defaults={"shots_source": "random"})
    plan = [(C.make_key(args.shots, i, spec.label, C.budget_label(b)), i, spec, b)
            for i in range(len(evalset)) for spec, b in C.runs(specs, budgets)]
    todo = set(store.pending(k for k, *_ in plan))
    print(f"gsm8k: {len(plan)} runs over {len(evalset)} problems ({args.shots}-shot), {store.skipped} already in "
          f"{args.out}, {len(todo)} to run", flush=True)
    if todo:
        C.setup(args)
        model, tok = C.load(args.model, args.attn)
        chat = not args.no_chat_template
        engine = C.engine_from_args(model, tok, args)
        bar = C.tqdm(total=len(todo), desc="gsm8k", disable=args.quiet)
        pending: list[C.Job] = []

        def flush():
            outs = engine.run(pending, desc="gsm8k")
            for job in pending:
                i = int(job.key.split("|")[1])
                ref = M.gsm8k_reference(evalset[i]["answer"])
                out = outs[job.key]
                store.put(job.key, C.base_entry(job, out) | {
                    "shots": args.shots, "index": i, "reference": ref,
                    "extracted": M.extract_last_number(out.text), "score": M.gsm8k_correct(out.text, ref)})
            store.save()
            bar.update(len(pending))
            pending.clear()

        stop = ("Question:",)
        warned = False
        by_index: dict[int, list] = {}
        for key, j, spec, b in plan:
            if key in todo:
                by_index.setdefault(j, []).append((key, spec, b))
        for i, ex in enumerate(evalset):
            runs = by_index.get(i)
            if not runs:
                continue
            ids = C.encode_prompt(tok, build_user(shots, ex["question"]), answer_prefix="" if chat else "Answer:",
                                  chat=chat)
            if len(ids) + args.max_new_tokens > C.model_window(model) and not warned:
                print(f"warning: {len(ids)}-token prompts plus {args.max_new_tokens} new tokens exceed the model "
                      f"window ({C.model_window(model)}); use fewer --shots", file=sys.stderr)
                warned = True
            pending.extend(C.Job(key, ids, spec, b, args.max_new_tokens, stop=stop) for key, spec, b in runs)
            if len(pending) >= 4 * args.batch_size:
                flush()
        if pending:
            flush()
        bar.close()
    store.save()
    for title, headers, rows in summarize(store.results):
        print(f"\nGSM8K ({args.model}), {title}:")
        print(C.format_table(headers, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
