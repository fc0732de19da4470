#!/usr/bin/env python3
"""LongBench (v1) and LongBench-E: all 21 tasks with LongBench's prompts, generation lengths and metrics,
scored per task (LongBench-E also per length bucket).

--data is a .jsonl file, a comma list of them, or a folder of them (default $CHUNKKV_SHARED/data/longbench),
or ``hf:NAME:TASK[:SPLIT]`` to load a task with the Hugging Face ``datasets`` package (installed and online).
Each line has LongBench's fields (``input``, ``context``, ``answers``, ``all_classes``, ``length``,
``dataset``, ``_id``, ...). A record's task is its ``dataset`` field; a record without one takes the name of
its file (``multi_news.jsonl``) or of its ``hf:`` task, so one file may mix tasks. A name ending in ``_e``
(``hotpotqa_e``, in the field, the file name or the ``hf:`` task) is LongBench-E: the task of the same name
without it, reported apart and per length. An unknown task is an error, raised before any model loads.
``--limit N`` takes the first N records of each task (LongBench-E's counted apart); each (task, ``_id``) runs once.

As THUDM/LongBench's pred.py and eval.py do:

* the task's template (``dataset2prompt``) is filled with the record's ``context`` and ``input``;
* a prompt of more than ``max_length`` tokens (counted with the tokenizer's special tokens, e.g. BOS) keeps
  its first and its last ``max_length // 2`` tokens, decoded back to text without special tokens, and only
  then goes through the chat template -- except for trec, triviaqa, samsum, lsht, lcc and repobench-p,
  which get none;
* generation is greedy, up to the task's length (``dataset2maxlen``; ``--max-new-tokens`` overrides it);
* for trec, triviaqa, samsum and lsht the prediction is its first line (``pred.lstrip("\\n")`` up to the
  next newline; generation stops once that line is complete, which changes nothing that is scored);
* the task's metric (``dataset2metric``, chunkkv/eval/metrics.py) is the best over the reference answers;
* scores are reported per task and, for LongBench-E, per task and length bucket of the record's ``length``
  field (0-4k: < 4000, 4-8k: < 8000, 8k+), as eval.py's ``scorer_e``.

``max_length``: LongBench sets one per model (``model2maxlen``, e.g. 3500 for Llama-2-7B-chat-4k). Here it
is ``--max-length`` when given, else, per task, the model's window minus the task's generation length minus
the tokens the chat template adds, so that prompt and answer fit the window (with that default, a prompt
whose re-encoded halves come out a few tokens longer is cut again, by those tokens).

Where this differs from LongBench: the chat template is the tokenizer's own (LongBench writes one per model);
generation stops at the tokenizer's end-of-text/turn tokens (chunkkv/eval/harness.py); for samsum LongBench
also forbids ending before the first new token, which is not done here.

Results entries carry ``task``, ``dataset`` (the task, with ``_e`` for LongBench-E), ``metric``,
``length``, for LongBench-E ``bucket``, and ``prediction``: the generated text before post-processing, as in
LongBench's prediction files; keys are ``dataset|id|method|budget``, as before for LongBench
v1, so older results files still resume and report. Stored entries scored by an older version of the
metrics are rescored from their stored predictions when a rerun has their examples.

    chunkkv-eval longbench --data multi_news.jsonl --limit 30 --budgets 0.1
    chunkkv-eval longbench --data hotpotqa_e.jsonl,lsht.jsonl --max-length 3500
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from . import harness as C
from . import metrics as M

SCRIPT = "longbench"


@dataclass(frozen=True)
class Task:
    """One LongBench task: its prompt template (``dataset2prompt``, with ``{context}`` and ``{input}``), its
    generation length (``dataset2maxlen``) and the name of its metric (``dataset2metric``)."""

    template: str
    max_new_tokens: int
    metric: str


_MULTI_DOC = ("Answer the question based on the given passages. Only give me the answer and do not output any "
              "other words.\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the "
              "given passages. Only give me the answer and do not output any other words.\n\nQuestion: {input}\n"
              "Answer:")
_QASPER_HOW = ("as concisely as you can, using a single phrase or sentence if possible. If the question cannot be "
               "answered based on the information in the article, write \"unanswerable\". If the question is a "
               "yes/no question, answer \"yes\", \"no\", or \"unanswerable\". Do not provide any explanation.")

#: the 21 LongBench tasks (LongBench-E has 13 of them)
TASKS: dict[str, Task] = {
    "narrativeqa": Task(
        "You are given a story, which can be either a novel or a movie script, and a question. Answer the question "
        "as concisely as you can, using a single phrase if possible. Do not provide any explanation.\n\nStory: "
        "{context}\n\nNow, answer the question based on the story as concisely as you can, using a single phrase "
        "if possible. Do not provide any explanation.\n\nQuestion: {input}\n\nAnswer:", 128, "qa_f1_score"),
    "qasper": Task(
        "You are given a scientific article and a question. Answer the question " + _QASPER_HOW + "\n\nArticle: "
        "{context}\n\n Answer the question based on the above article " + _QASPER_HOW + "\n\nQuestion: {input}\n\n"
        "Answer:", 128, "qa_f1_score"),
    "multifieldqa_en": Task(
        "Read the following text and answer briefly.\n\n{context}\n\nNow, answer the following question based on "
        "the above text, only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:",
        64, "qa_f1_score"),
    "multifieldqa_zh": Task(
        "阅读以下文字并用中文简短回答：\n\n{context}\n\n现在请基于上面的文章回答下面的问题，只告诉我答案，不要输出任何其他字词。\n\n"
        "问题：{input}\n回答：", 64, "qa_f1_zh_score"),
    "hotpotqa": Task(_MULTI_DOC, 32, "qa_f1_score"),
    "2wikimqa": Task(_MULTI_DOC, 32, "qa_f1_score"),
    "musique": Task(_MULTI_DOC, 32, "qa_f1_score"),
    "dureader": Task("请基于给定的文章回答下述问题。\n\n文章：{context}\n\n请基于上述文章回答下面的问题。\n\n问题：{input}\n回答：",
                     128, "rouge_zh_score"),
    "gov_report": Task(
        "You are given a report by a government agency. Write a one-page summary of the report.\n\nReport:\n"
        "{context}\n\nNow, write a one-page summary of the report.\n\nSummary:", 512, "rouge_score"),
    "qmsum": Task(
        "You are given a meeting transcript and a query containing a question or instruction. Answer the query in "
        "one or more sentences.\n\nTranscript:\n{context}\n\nNow, answer the query based on the above meeting "
        "transcript in one or more sentences.\n\nQuery: {input}\nAnswer:", 512, "rouge_score"),
    "multi_news": Task(
        "You are given several news passages. Write a one-page summary of all news. \n\nNews:\n{context}\n\n"
        "Now, write a one-page summary of all the news.\n\nSummary:", 512, "rouge_score"),
    "vcsum": Task("下面有一段会议记录，请你阅读后，写一段总结，总结会议的内容。\n会议记录：\n{context}\n\n会议总结：", 512,
                  "rouge_zh_score"),
    "trec": Task(
        "Please determine the type of the question below. Here are some examples of questions.\n\n{context}\n"
        "{input}", 64, "classification_score"),
    "triviaqa": Task(
        "Answer the question based on the given passage. Only give me the answer and do not output any other "
        "words. The following are some examples.\n\n{context}\n\n{input}", 32, "qa_f1_score"),
    "samsum": Task(
        "Summarize the dialogue into a few short sentences. The following are some examples.\n\n{context}\n\n"
        "{input}", 128, "rouge_score"),
    "lsht": Task("请判断给定新闻的类别，下面是一些例子。\n\n{context}\n{input}", 64, "classification_score"),
    "passage_count": Task(
        "There are some paragraphs below sourced from Wikipedia. Some of them may be duplicates. Please carefully "
        "read these paragraphs and determine how many unique paragraphs there are after removing duplicates. In "
        "other words, how many non-repeating paragraphs are there in total?\n\n{context}\n\nPlease enter the final "
        "count of unique paragraphs after removing duplicates. The output format should only contain the number, "
        "such as 1, 2, 3, and so on.\n\nThe final answer is: ", 32, "count_score"),
    "passage_retrieval_en": Task(
        "Here are 30 paragraphs from Wikipedia, along with an abstract. Please determine which paragraph the "
        "abstract is from.\n\n{context}\n\nThe following is an abstract.\n\n{input}\n\nPlease enter the number of "
        "the paragraph that the abstract is from. The answer format must be like \"Paragraph 1\", \"Paragraph 2\", "
        "etc.\n\nThe answer is: ", 32, "retrieval_score"),
    "passage_retrieval_zh": Task(
        "以下是若干段落文字，以及其中一个段落的摘要。请确定给定的摘要出自哪一段。\n\n{context}\n\n下面是一个摘要\n\n{input}\n\n"
        "请输入摘要所属段落的编号。答案格式必须是\"段落1\"，\"段落2\"等格式\n\n答案是：", 32, "retrieval_zh_score"),
    "lcc": Task("Please complete the code given below. \n{context}Next line of code:\n", 64, "code_sim_score"),
    "repobench-p": Task("Please complete the code given below. \n{context}{input}Next line of code:\n", 64,
                        "code_sim_score"),
}
#: LongBench's metric names (dataset2metric) -> chunkkv/eval/metrics.py
METRICS: dict[str, Callable[..., float]] = {
    "qa_f1_score": M.qa_f1,
    "qa_f1_zh_score": M.qa_f1_zh,
    "rouge_score": M.rouge_l,
    "rouge_zh_score": M.rouge_l_zh,
    "classification_score": M.classification_score,
    "retrieval_score": M.retrieval_score,
    "retrieval_zh_score": M.retrieval_zh_score,
    "count_score": M.count_score,
    "code_sim_score": M.code_sim,
}
#: no chat template: few-shot and code-completion prompts (pred.py: chat models do better without it there)
NO_CHAT = frozenset({"trec", "triviaqa", "samsum", "lsht", "lcc", "repobench-p"})
#: the prediction is its first line (eval.py)
FIRST_LINE = frozenset({"trec", "triviaqa", "samsum", "lsht"})
#: LongBench-E's length buckets (eval.py's scorer_e): upper bound of the record's ``length`` -> name
BUCKETS: tuple[tuple[float, str], ...] = ((4000, "0-4k"), (8000, "4-8k"), (float("inf"), "8k+"))
#: bumped when a metric changes: stored entries with another value are rescored from their predictions
SCORING = 2


def length_bucket(length: Any) -> str:
    """LongBench-E's bucket of a record's ``length`` field: "0-4k", "4-8k" or "8k+"."""
    if isinstance(length, bool) or not isinstance(length, (int, float)):
        raise ValueError(f"chunkkv.eval.longbench: a LongBench-E record's length must be a number, got {length!r}")
    return next(name for bound, name in BUCKETS if length < bound)


def task_name(name: str, where: str) -> tuple[str, bool]:
    """(task, is LongBench-E) of a LongBench dataset name: ``hotpotqa`` -> (hotpotqa, False), ``hotpotqa_e`` ->
    (hotpotqa, True). Raises ValueError for a name that is not one of the 21 tasks (where: what named it)."""
    if name in TASKS:
        return name, False
    if name.endswith("_e") and name[:-2] in TASKS:
        return name[:-2], True
    raise ValueError(f"chunkkv.eval.longbench: {where}: unknown LongBench task {name!r}; expected one of "
                     f"{', '.join(TASKS)} (a trailing _e for LongBench-E)")


def source_name(source: Path | str) -> str:
    """The dataset name a data source stands for: a file's stem, or TASK of ``hf:NAME:TASK[:SPLIT]``."""
    if isinstance(source, Path):
        return source.stem
    parts = source[len(C.HF_PREFIX):].split(":")
    if len(parts) < 2 or not parts[1]:
        raise SystemExit(f"{source}: expected hf:NAME:TASK[:SPLIT], e.g. hf:THUDM/LongBench:multi_news")
    return parts[1]


@dataclass
class Example:
    """One record to run: its task, its id, the record itself and whether it is LongBench-E's."""

    task: str
    id: str
    record: dict
    longbench_e: bool

    @property
    def dataset(self) -> str:
        """The name it is keyed and reported under: the task, + ``_e`` for LongBench-E."""
        return self.task + "_e" if self.longbench_e else self.task


def examples_of(source: Path | str, records: Sequence[dict]) -> list[Example]:
    """The examples of one data source's records: each record's task from its ``dataset`` field, else from the
    source's name; LongBench-E when either name ends in ``_e``."""
    fallback = source_name(source)
    source_e = fallback.endswith("_e")
    out = []
    for i, record in enumerate(records):
        if not isinstance(record, dict):
            raise ValueError(f"chunkkv.eval.longbench: {source}: record {i} is a {type(record).__name__}, "
                             "expected a JSON object")
        name = record.get("dataset") or fallback
        task, is_e = task_name(str(name), f"{source}: record {i}")
        is_e = is_e or source_e
        eid = str(record.get("_id") or i)
        out.append(Example(task, eid, record, is_e))
    return out


def load_examples(sources: Sequence[Path | str], limit: Optional[int] = None) -> list[Example]:
    """Every example of the sources, in order, at most ``limit`` per task (LongBench-E's apart), each (task,
    id) once."""
    out, seen, count = [], set(), {}
    for source in sources:
        for ex in examples_of(source, C.read_records(source, default_split="test")):
            if (ex.dataset, ex.id) in seen or (limit and count.get(ex.dataset, 0) >= limit):
                continue
            seen.add((ex.dataset, ex.id))
            count[ex.dataset] = count.get(ex.dataset, 0) + 1
            out.append(ex)
    return out


def data_files(spec: str) -> list[Path | str]:
    """The .jsonl files of --data (a folder: all its .jsonl files); ``hf:NAME:TASK[:SPLIT]`` entries (Hugging
    Face datasets) are kept as given."""
    out: list[Path | str] = []
    for part in spec.split(","):
        if C.is_hf_spec(part):
            out.append(part.strip())
            continue
        p = Path(part.strip()).expanduser()
        if p.is_dir():
            out.extend(sorted(p.glob("*.jsonl")))
        elif p.is_file():
            out.append(p)
        else:
            raise SystemExit(f"--data: {p} not found")
    if not out:
        raise SystemExit(f"--data {spec}: no LongBench .jsonl file")
    return out


def fill_template(task: str, record: dict) -> str:
    """The task's prompt for a record (before truncation and chat template)."""
    missing = [k for k in ("context", "input") if not isinstance(record.get(k), str)]
    if missing:
        raise ValueError(f"chunkkv.eval.longbench: a {task} record ({record.get('_id', 'no _id')}) needs string "
                         f"fields context and input; {', '.join(missing)} missing or not a string")
    return TASKS[task].template.format(context=record["context"], input=record["input"])


def truncate_middle(tokenizer: Any, text: str, max_length: int) -> str:
    """LongBench's truncation: if ``text`` has more than ``max_length`` tokens (special tokens such as BOS
    included), its first and its last ``max_length // 2`` tokens, each half decoded without special tokens;
    else the text itself."""
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
        raise ValueError(f"chunkkv.eval.longbench.truncate_middle: max_length must be an int >= 2, got {max_length!r}")
    ids = list(tokenizer(text).input_ids)
    if len(ids) <= max_length:
        return text
    half = max_length // 2
    return (tokenizer.decode(ids[:half], skip_special_tokens=True)
            + tokenizer.decode(ids[-half:], skip_special_tokens=True))


def prompt_ids(tokenizer: Any, task: str, record: dict, max_length: int, *, chat: bool,
               room: Optional[int] = None) -> list[int]:
    """Token ids of a record's prompt: the template filled, cut to ``max_length`` tokens in the middle, then the
    chat template if ``chat`` and the task takes one. With ``room``, a prompt that still comes out longer than
    ``room`` tokens (the halves can re-encode to a few more tokens) is cut again, shorter by the excess."""
    text = fill_template(task, record)
    chat = chat and task not in NO_CHAT
    for _ in range(4):
        ids = C.encode_prompt(tokenizer, truncate_middle(tokenizer, text, max_length), chat=chat)
        if room is None or len(ids) <= room:
            break
        max_length -= len(ids) - room
        if max_length < 2:
            break
    return ids


def first_line(prediction: str) -> str:
    """LongBench's post-processing of trec, triviaqa, samsum and lsht: the first line after leading newlines."""
    return prediction.lstrip("\n").split("\n")[0]


def score(task: str, prediction: str, record: dict) -> float:
    """The task's metric of a prediction: the best over the record's answers, after the task's post-processing."""
    if task not in TASKS:
        raise ValueError(f"chunkkv.eval.longbench.score: unknown LongBench task {task!r}; expected one of "
                         f"{', '.join(TASKS)}")
    metric = TASKS[task].metric
    if task in FIRST_LINE:
        prediction = first_line(prediction)
    answers = record.get("answers") or []
    if isinstance(answers, str):
        answers = [answers]
    kw = {"all_classes": record.get("all_classes")} if metric == "classification_score" else {}
    return M.best_over(METRICS[metric], prediction, answers, **kw)


def entry_fields(ex: Example, prediction: str) -> dict:
    """The LongBench fields of a results entry (besides the engine's), scored."""
    fields = {"task": ex.task, "dataset": ex.dataset, "id": ex.id, "metric": TASKS[ex.task].metric,
              "length": ex.record.get("length"), "prediction": prediction,
              "score": score(ex.task, prediction, ex.record), "scoring": SCORING}
    if ex.longbench_e:
        fields["bucket"] = length_bucket(ex.record.get("length"))
    return fields


def rescore(results: dict, by_key: dict[str, Example]) -> int:
    """Rescore, from their stored predictions, the entries of ``by_key`` scored by another version of the
    metrics (:data:`SCORING`); returns how many changed."""
    n = 0
    for key, ex in by_key.items():
        entry = results.get(key)
        if entry is None or entry.get("scoring") == SCORING or "prediction" not in entry:
            continue
        entry.update(entry_fields(ex, entry["prediction"]))
        n += 1
    return n


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="chunkkv-eval longbench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    default = C.default_shared("data", "longbench")
    p.add_argument("--data", default=str(default) if default else None, required=default is None,
                   help="a LongBench .jsonl file, a comma list of them, or a folder (default "
                        "$CHUNKKV_SHARED/data/longbench)")
    p.add_argument("--max-length", type=int, default=None,
                   help="prompt tokens before the middle is cut, for every task (default: model window - task's "
                        "generation length - chat template)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="override every task's generation length")
    C.add_common_args(p, budgets="0.1", out=str(C.RESULTS_DIR / "longbench.json"))
    args = p.parse_args(argv)
    if args.max_length is not None and args.max_length < 2:
        p.error(f"--max-length must be at least 2, got {args.max_length}")
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        p.error(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    return args


def summarize(results: dict) -> list[tuple[str, list[str], list[list]]]:
    """Mean score per task (LongBench-E tasks as ``task_e``) and, for LongBench-E, per task and length bucket.
    Entries written before the ``dataset`` field count under their ``task``."""
    rows = {k: {**e, "dataset": e.get("dataset") or e.get("task")} for k, e in results.items()}
    h, r = C.summary_table(rows, ["dataset"], scale=100)
    title = "score by task (x100; ROUGE-L F for summaries, QA F1, accuracy, edit similarity)"
    stale = sum(e.get("scoring") != SCORING for e in results.values() if "score" in e)
    if stale:  # say so rather than mix metric versions silently
        title += (f"; {stale} of {len(results)} entries were scored by an earlier version of the metrics "
                  "(a rerun of the command rescores them from their stored predictions)")
    out = [(title, h, r)]
    e_rows = {k: e for k, e in rows.items() if e.get("bucket")}
    if e_rows:
        h, r = C.summary_table(e_rows, ["dataset", "bucket"], scale=100)
        out.append(("LongBench-E: score by task and length of the record (x100; 0-4k, 4-8k, 8k+)", h, r))
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    specs = C.parse_methods(args.methods)
    budgets = C.parse_budgets(args.budgets)
    files = data_files(args.data)
    config = C.common_config(args) | {"data": [str(f) for f in files], "max_length": args.max_length,
                                      "max_new_tokens": args.max_new_tokens}
    store = C.ResultStore(args.out, SCRIPT, config)
    try:
        examples = load_examples(files, args.limit)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    plan = [(C.make_key(ex.dataset, ex.id, spec.label, C.budget_label(b)), ex, spec, b)
            for ex in examples for spec, b in C.runs(specs, budgets)]
    rescored = rescore(store.results, {key: ex for key, ex, *_ in plan})
    if rescored:
        print(f"longbench: rescored {rescored} stored entries with the current metrics", flush=True)
        store.save()
    todo = set(store.pending(k for k, *_ in plan))
    print(f"longbench: {len(plan)} runs over {len(examples)} examples, {store.skipped} already in {args.out}, "
          f"{len(todo)} to run", flush=True)
    if todo:
        C.setup(args)
        model, tok = C.load(args.model, args.attn)
        use_chat = not args.no_chat_template and C.has_chat_template(tok)
        window = C.model_window(model)
        engine = C.engine_from_args(model, tok, args)
        specials = getattr(tok, "num_special_tokens_to_add", lambda: 0)()
        # what each prompt adds to the tokens truncate_middle counts: the chat template minus the special tokens
        extra = {chat: len(C.encode_prompt(tok, "", chat=chat)) - specials for chat in {False, use_chat}}
        bar = C.tqdm(total=len(todo), desc="longbench", disable=args.quiet)
        pending: list[C.Job] = []
        meta: dict[str, Example] = {}

        def flush():
            outs = engine.run(pending, desc="longbench")
            for job in pending:
                ex, out = meta[job.key], outs[job.key]
                # the first-line tasks stop early: score the raw text, as LongBench post-processes it
                text = tok.decode(out.tokens, skip_special_tokens=True) if ex.task in FIRST_LINE else out.text
                store.put(job.key, C.base_entry(job, out) | entry_fields(ex, text))
            store.save()
            bar.update(len(pending))
            pending.clear()

        by_example: dict[tuple[str, str], list] = {}
        for key, ex, spec, b in plan:
            if key in todo:
                by_example.setdefault((ex.dataset, ex.id), []).append((key, ex, spec, b))
        for runs in by_example.values():
            ex = runs[0][1]
            max_new = args.max_new_tokens or TASKS[ex.task].max_new_tokens
            chat = use_chat and ex.task not in NO_CHAT
            room = window - max_new
            limit = args.max_length or room - extra[chat]
            if limit < 2:
                raise SystemExit(f"chunkkv-eval longbench: {ex.task}: the model's window ({window} tokens) leaves no "
                                 f"room for a prompt before {max_new} new tokens; pass --max-new-tokens or "
                                 "--max-length")
            ids = prompt_ids(tok, ex.task, ex.record, limit, chat=use_chat,
                             room=None if args.max_length else room)
            stop = ("\n",) if ex.task in FIRST_LINE else ()
            for key, _, spec, b in runs:
                pending.append(C.Job(key, ids, spec, b, max_new, stop=stop))
                meta[key] = ex
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
