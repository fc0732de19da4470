#!/usr/bin/env python3
"""LongBench (v1) tasks: any task's .jsonl file(s), with its prompt template, generation length and metric.

--data is a .jsonl file, a comma list of them, or a folder of them (default $CHUNKKV_SHARED/data/longbench),
or ``hf:NAME:TASK[:SPLIT]`` to load a task with the Hugging Face ``datasets`` package (installed and online);
the task is the file name (``multi_news.jsonl``; LongBench-E's ``multi_news_e.jsonl`` is multi_news too).
Each line has LongBench's fields (``input``, ``context``, ``answers``, ``all_classes``, ``_id``, ...).

As in LongBench's evaluation: the task's template is filled with the example, a prompt longer than the
model allows is cut in the middle (its first and last halves of tokens are kept), the prompt goes through
the chat template except for the few-shot and code-completion tasks (trec, triviaqa, samsum, lsht, lcc,
repobench-p), generation is greedy up to the task's maximum length, the few-shot tasks' answers are cut
to their first line, and the task's metric (chunkkv/eval/metrics.py) is the best over the reference answers.

    chunkkv-eval longbench --data multi_news.jsonl --limit 30 --budgets 0.1
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import harness as C
from . import metrics as M

SCRIPT = "longbench"

_QA_MULTI = ("Answer the question based on the given passages. Only give me the answer and do not output any "
             "other words.\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the "
             "given passages. Only give me the answer and do not output any other words.\n\nQuestion: {input}\n"
             "Answer:")
_QASPER_RULE = ("Answer the question as concisely as you can, using a single phrase or sentence if possible. If the "
                "question cannot be answered based on the information in the article, write \"unanswerable\". If "
                "the question is a yes/no question, answer \"yes\", \"no\", or \"unanswerable\". Do not provide any "
                "explanation.")

#: task -> (prompt template, max new tokens, metric name)
TASKS: dict[str, tuple[str, int, str]] = {
    "narrativeqa": (
        "You are given a story, which can be either a novel or a movie script, and a question. Answer the question "
        "as concisely as you can, using a single phrase if possible. Do not provide any explanation.\n\nStory: "
        "{context}\n\nNow, answer the question based on the story as concisely as you can, using a single phrase "
        "if possible. Do not provide any explanation.\n\nQuestion: {input}\n\nAnswer:", 128, "qa_f1"),
    "qasper": (
        "You are given a scientific article and a question. " + _QASPER_RULE + "\n\nArticle: {context}\n\n"
        "Answer the question based on the above article. " + _QASPER_RULE + "\n\nQuestion: {input}\n\nAnswer:",
        128, "qa_f1"),
    "multifieldqa_en": (
        "Read the following text and answer briefly.\n\n{context}\n\nNow, answer the following question based on "
        "the above text, only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:",
        64, "qa_f1"),
    "hotpotqa": (_QA_MULTI, 32, "qa_f1"),
    "2wikimqa": (_QA_MULTI, 32, "qa_f1"),
    "musique": (_QA_MULTI, 32, "qa_f1"),
    "gov_report": (
        "You are given a report by a government agency. Write a one-page summary of the report.\n\nReport:\n"
        "{context}\n\nNow, write a one-page summary of the report.\n\nSummary:", 512, "rouge_l"),
    "qmsum": (
        "You are given a meeting transcript and a query containing a question or instruction. Answer the query in "
        "one or more sentences.\n\nTranscript:\n{context}\n\nNow, answer the query based on the above meeting "
        "transcript in one or more sentences.\n\nQuery: {input}\nAnswer:", 512, "rouge_l"),
    "multi_news": (
        "You are given several news passages. Write a one-page summary of all news. \n\nNews:\n{context}\n\n"
        "Now, write a one-page summary of all the news.\n\nSummary:", 512, "rouge_l"),
    "trec": (
        "Please determine the type of the question below. Here are some examples of questions.\n\n{context}\n"
        "{input}", 64, "classification"),
    "triviaqa": (
        "Answer the question based on the given passage. Only give me the answer and do not output any other "
        "words. The following are some examples.\n\n{context}\n\n{input}", 32, "qa_f1"),
    "samsum": (
        "Summarize the dialogue into a few short sentences. The following are some examples.\n\n{context}\n\n"
        "{input}", 128, "rouge_l"),
    "passage_count": (
        "There are some paragraphs below sourced from Wikipedia. Some of them may be duplicates. Please carefully "
        "read these paragraphs and determine how many unique paragraphs there are after removing duplicates. In "
        "other words, how many non-repeating paragraphs are there in total?\n\n{context}\n\nPlease enter the final "
        "count of unique paragraphs after removing duplicates. The output format should only contain the number, "
        "such as 1, 2, 3, and so on.\n\nThe final answer is: ", 32, "count"),
    "passage_retrieval_en": (
        "Here are 30 paragraphs from Wikipedia, along with an abstract. Please determine which paragraph the "
        "abstract is from.\n\n{context}\n\nThe following is an abstract.\n\n{input}\n\nPlease enter the number of "
        "the paragraph that the abstract is from. The answer format must be like \"Paragraph 1\", \"Paragraph 2\", "
        "etc.\n\nThe answer is: ", 32, "retrieval"),
    "lcc": ("Please complete the code given below. \n{context}Next line of code:\n", 64, "code_sim"),
    "repobench-p": ("Please complete the code given below. \n{context}{input}Next line of code:\n", 64, "code_sim"),
}
#: few-shot and completion tasks: no chat template, answer = first line
RAW_TASKS = {"trec", "triviaqa", "samsum", "lsht", "lcc", "repobench-p"}


def score(task: str, prediction: str, example: dict) -> float:
    metric = TASKS[task][2]
    if task in RAW_TASKS:
        prediction = prediction.lstrip("\n").split("\n")[0]
    answers = example.get("answers") or []
    if isinstance(answers, str):
        answers = [answers]
    if metric == "qa_f1":
        return M.best_over(M.qa_f1, prediction, answers)
    if metric == "rouge_l":
        return M.best_over(M.rouge_l, prediction, answers)
    if metric == "classification":
        return M.best_over(M.classification_score, prediction, answers, all_classes=example.get("all_classes") or [])
    if metric == "retrieval":
        return M.best_over(M.retrieval_score, prediction, answers)
    if metric == "count":
        return M.best_over(M.count_score, prediction, answers)
    if metric == "code_sim":
        return M.best_over(M.code_sim, prediction, answers)
    raise ValueError(metric)


def task_of(path: Path | str) -> str:
    if isinstance(path, str):  # hf:NAME:TASK[:SPLIT]
        parts = path[len(C.HF_PREFIX):].split(":")
        if len(parts) < 2 or not parts[1]:
            raise SystemExit(f"{path}: expected hf:NAME:TASK[:SPLIT], e.g. hf:THUDM/LongBench:multi_news")
        path = Path(parts[1])
    name = path.stem
    if name not in TASKS and name.endswith("_e") and name[:-2] in TASKS:
        name = name[:-2]
    if name not in TASKS:
        raise SystemExit(f"{path}: unknown LongBench task {name!r} (known: {', '.join(TASKS)})")
    return name


def data_files(spec: str) -> list[Path | str]:
    """The task files of --data; ``hf:NAME:TASK[:SPLIT]`` entries (Hugging Face datasets) are kept as given."""
    out: list[Path | str] = []
    for part in spec.split(","):
        if C.is_hf_spec(part):
            out.append(part.strip())
            continue
        p = Path(part.strip()).expanduser()
        if p.is_dir():
            out.extend(sorted(f for f in p.glob("*.jsonl") if f.stem in TASKS or f.stem[:-2] in TASKS))
        elif p.is_file():
            out.append(p)
        else:
            raise SystemExit(f"--data: {p} not found")
    if not out:
        raise SystemExit(f"--data {spec}: no LongBench task file")
    return out


def truncate_middle(tokenizer, text: str, max_tokens: int) -> str:
    """Keep the first and last max_tokens/2 tokens of text (LongBench's truncation)."""
    ids = tokenizer(text, add_special_tokens=False).input_ids
    if len(ids) <= max_tokens:
        return text
    half = max_tokens // 2
    return tokenizer.decode(ids[:half], skip_special_tokens=True) + \
        tokenizer.decode(ids[len(ids) - (max_tokens - half):], skip_special_tokens=True)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="chunkkv-eval longbench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    default = C.default_shared("data", "longbench")
    p.add_argument("--data", default=str(default) if default else None, required=default is None,
                   help="a LongBench .jsonl file, a comma list of them, or a folder (default "
                        "$CHUNKKV_SHARED/data/longbench)")
    p.add_argument("--max-length", type=int, default=None,
                   help="prompt tokens before the middle is cut (default: model window - task max length - chat "
                        "template)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="override every task's generation length")
    C.add_common_args(p, budgets="0.1", out=str(C.RESULTS_DIR / "longbench.json"))
    return p.parse_args(argv)


def summarize(results: dict) -> list[tuple[str, list[str], list[list]]]:
    h, r = C.summary_table(results, ["task"], scale=100)
    return [("score by task (x100; ROUGE-L F for summaries, QA F1, accuracy, edit similarity)", h, r)]


def main(argv=None) -> int:
    args = parse_args(argv)
    specs = C.parse_methods(args.methods)
    budgets = C.parse_budgets(args.budgets)
    files = data_files(args.data)
    config = C.common_config(args) | {"data": [str(f) for f in files], "max_length": args.max_length,
                                      "max_new_tokens": args.max_new_tokens}
    store = C.ResultStore(args.out, SCRIPT, config)
    examples = []
    for f in files:
        task = task_of(f)
        rows = C.read_records(f, default_split="test")
        for i, ex in enumerate(rows[: args.limit] if args.limit else rows):
            examples.append((task, str(ex.get("_id") or i), ex))
    plan = [(C.make_key(task, eid, spec.label, C.budget_label(b)), task, eid, ex, spec, b)
            for task, eid, ex in examples for spec, b in C.runs(specs, budgets)]
    todo = set(store.pending(k for k, *_ in plan))
    print(f"longbench: {len(plan)} runs over {len(examples)} examples, {store.skipped} already in {args.out}, "
          f"{len(todo)} to run", flush=True)
    if todo:
        C.setup(args)
        model, tok = C.load(args.model, args.attn)
        use_chat = not args.no_chat_template and C.has_chat_template(tok)
        window = C.model_window(model)
        engine = C.engine_from_args(model, tok, args)
        overhead = len(C.encode_prompt(tok, "", chat=use_chat))
        bar = C.tqdm(total=len(todo), desc="longbench", disable=args.quiet)
        pending: list[C.Job] = []
        meta: dict[str, tuple[str, str, dict]] = {}

        def flush():
            outs = engine.run(pending, desc="longbench")
            for job in pending:
                task, eid, ex = meta[job.key]
                out = outs[job.key]
                store.put(job.key, C.base_entry(job, out) | {"task": task, "id": eid,
                                                             "score": score(task, out.text, ex)})
            store.save()
            bar.update(len(pending))
            pending.clear()

        by_example: dict[tuple[str, str], list] = {}
        for key, task, eid, ex, spec, b in plan:
            if key in todo:
                by_example.setdefault((task, eid), []).append((key, ex, spec, b))
        for (task, eid), runs in by_example.items():
            template, max_new, _ = TASKS[task]
            if args.max_new_tokens:
                max_new = args.max_new_tokens
            ex = runs[0][1]
            chat = use_chat and task not in RAW_TASKS
            limit = args.max_length or (window - max_new - (overhead if chat else 1))
            prompt = template.format(context=ex.get("context", ""), input=ex.get("input", ""))
            prompt = truncate_middle(tok, prompt, limit)
            ids = C.encode_prompt(tok, prompt, chat=chat)
            stop = ("\n",) if task in RAW_TASKS else ()
            for key, ex, spec, b in runs:
                pending.append(C.Job(key, ids, spec, b, max_new, stop=stop))
                meta[key] = (task, eid, ex)
            if len(pending) >= max(args.batch_size, len(runs)):
                flush()
        if pending:
            flush()
        bar.close()
    store.save()
    for title, headers, rows in summarize(store.results):
        print(f"\nLongBench ({args.model}), {title}:")
        print(C.format_table(headers, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
