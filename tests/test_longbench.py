"""LongBench's evaluation as chunkkv/eval/longbench.py runs it, without a model: the 21 tasks, each record's
task from its ``dataset`` field (LongBench-E's ``_e`` too), truncation of the prompt's middle before the chat
template, the post-processing and metric of each task, results entries and their summary tables."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from shared_data import stories_folder

from chunkkv.eval import harness as C
from chunkkv.eval import longbench as L
from chunkkv.eval import metrics as M

ROOT = Path(__file__).resolve().parents[1]
BOS = 256


class Bytes:
    """A byte-level tokenizer with a BOS id that encoding prepends (as Llama's), without a chat template."""

    chat_template = None

    def __call__(self, text, add_special_tokens=True):
        ids = ([BOS] if add_special_tokens else []) + list(text.encode())
        return type("Encoding", (), {"input_ids": ids})()

    def decode(self, ids, skip_special_tokens=False):
        return bytes(i for i in ids if i != BOS).decode(errors="replace") if skip_special_tokens else \
            "".join("<s>" if i == BOS else chr(i) for i in ids)


class BytesChat(Bytes):
    """The same, with a chat template that wraps the user's message in <u>...</u>."""

    chat_template = "<u>{content}</u>"

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
        return "<u>" + messages[-1]["content"] + "</u>"


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def record(**fields) -> dict:
    return {"input": "q", "context": "c", "answers": ["a"], "all_classes": None, "length": 100} | fields


# -- the tasks -----------------------------------------------------------------------------------------
def test_all_21_tasks_with_prompts_lengths_and_metrics():
    names = ("narrativeqa qasper multifieldqa_en multifieldqa_zh hotpotqa 2wikimqa musique dureader gov_report "
             "qmsum multi_news vcsum trec triviaqa samsum lsht passage_count passage_retrieval_en "
             "passage_retrieval_zh lcc repobench-p").split()
    assert list(L.TASKS) == names
    no_input = {"gov_report", "multi_news", "vcsum", "passage_count", "lcc"}  # LongBench's templates without it
    for name, task in L.TASKS.items():
        assert "{context}" in task.template and ("{input}" in task.template) == (name not in no_input), name
        filled = task.template.format(context="<CONTEXT>", input="<INPUT>")
        assert "<CONTEXT>" in filled and "{" not in filled, name
        assert task.max_new_tokens > 0 and task.metric in L.METRICS, name
    chinese = {"multifieldqa_zh", "dureader", "vcsum", "lsht", "passage_retrieval_zh"}
    for name in chinese:  # Chinese prompts, and the Chinese metric wherever one exists
        assert any("\u4e00" <= ch <= "\u9fff" for ch in L.TASKS[name].template), name
        assert L.TASKS[name].metric in ("qa_f1_zh_score", "rouge_zh_score", "classification_score",
                                        "retrieval_zh_score"), name
    assert L.FIRST_LINE < L.NO_CHAT <= set(L.TASKS)


# -- the task of each record ---------------------------------------------------------------------------
def test_task_from_the_dataset_field_of_a_mixed_file(tmp_path):
    f = write_jsonl(tmp_path / "mixed.jsonl", [record(dataset="hotpotqa", _id="h1"),
                                               record(dataset="passage_retrieval_zh", _id="p1"),
                                               record(dataset="hotpotqa", _id="h2")])
    examples = L.load_examples([f])
    assert [(e.task, e.dataset, e.id, e.longbench_e) for e in examples] == [
        ("hotpotqa", "hotpotqa", "h1", False), ("passage_retrieval_zh", "passage_retrieval_zh", "p1", False),
        ("hotpotqa", "hotpotqa", "h2", False)]
    # --limit counts per task
    assert [e.id for e in L.load_examples([f], limit=1)] == ["h1", "p1"]
    # a record without the field takes the file's name
    trec = write_jsonl(tmp_path / "trec.jsonl", [record(_id="t1")])
    assert [(e.task, e.dataset) for e in L.load_examples([trec, f, f])][:2] == [("trec", "trec"),
                                                                              ("hotpotqa", "hotpotqa")]
    assert len(L.load_examples([trec, f, f])) == 4  # a file given twice: each (task, id) once


def test_longbench_e_file_and_field(tmp_path):
    f = write_jsonl(tmp_path / "hotpotqa_e.jsonl", [record(dataset="hotpotqa", _id="a", length=3999),
                                                    record(dataset="hotpotqa_e", _id="b", length=8000),
                                                    record(_id="c", length=4000)])
    examples = L.load_examples([f])
    assert {(e.task, e.dataset, e.longbench_e) for e in examples} == {("hotpotqa", "hotpotqa_e", True)}
    assert [L.entry_fields(e, "x")["bucket"] for e in examples] == ["0-4k", "8k+", "4-8k"]
    # the field alone marks LongBench-E in a file of another name
    g = write_jsonl(tmp_path / "some.jsonl", [record(dataset="lcc_e", _id="a"), record(dataset="lcc", _id="a")])
    assert [(e.task, e.dataset) for e in L.load_examples([g])] == [("lcc", "lcc_e"), ("lcc", "lcc")]


def test_unknown_task_is_a_clear_error(tmp_path):
    f = write_jsonl(tmp_path / "mixed.jsonl", [record(dataset="hotpotqa"), record(dataset="nope")])
    with pytest.raises(ValueError, match=r"chunkkv\.eval\.longbench: .*mixed\.jsonl: record 1: unknown LongBench "
                                         r"task 'nope'; expected one of narrativeqa, "):
        L.load_examples([f])
    g = write_jsonl(tmp_path / "notes.jsonl", [record()])  # no field, and the file name is no task
    with pytest.raises(ValueError, match="unknown LongBench task 'notes'"):
        L.load_examples([g])
    with pytest.raises(ValueError, match=r"chunkkv\.eval\.longbench\.score: unknown LongBench task 'hotpotqa_e'"):
        L.score("hotpotqa_e", "x", record())
    # the command stops before loading any model (this one does not exist)
    with pytest.raises(SystemExit, match="unknown LongBench task 'nope'"):
        L.main(["--data", str(f), "--model", str(tmp_path / "no-model"), "--out", str(tmp_path / "r.json")])


def test_length_buckets():
    assert [L.length_bucket(n) for n in (0, 3999, 4000, 7999, 8000, 10 ** 6)] == \
        ["0-4k", "0-4k", "4-8k", "4-8k", "8k+", "8k+"]
    for bad in (None, "5000", True):
        with pytest.raises(ValueError, match="chunkkv.eval.longbench: a LongBench-E record's length"):
            L.length_bucket(bad)


# -- truncation and prompts ----------------------------------------------------------------------------
def test_truncate_middle_keeps_the_halves_with_bos_counted():
    tok = Bytes()
    # 11 ids with BOS > 6: the first 3 ids (BOS, a, b) and the last 3 (h, i, j), BOS not decoded
    assert L.truncate_middle(tok, "abcdefghij", 6) == "abhij"
    assert L.truncate_middle(tok, "abcdefghij", 7) == "abhij"  # max_length // 2 from each end
    assert L.truncate_middle(tok, "abcdefghij", 11) == "abcdefghij"  # fits: unchanged
    for bad in (1, 0, 6.0, None):
        with pytest.raises(ValueError, match="chunkkv.eval.longbench.truncate_middle: max_length"):
            L.truncate_middle(tok, "abc", bad)


def test_truncate_middle_with_a_real_tokenizer():
    from chunkkv.models import stories260k_tokenizer

    tok = stories260k_tokenizer(stories_folder() / "tok512.bin")
    text = " ".join(f"Lily saw {n} birds in the park and she was happy." for n in range(40))
    ids = tok(text).input_ids
    assert ids[0] == tok.bos_token_id and len(ids) > 100
    cut = L.truncate_middle(tok, text, 41)
    head = tok.decode(ids[:20], skip_special_tokens=True)
    tail = tok.decode(ids[-20:], skip_special_tokens=True)
    assert cut == head + tail
    assert text.startswith(head) and text.endswith(tail) and len(head) > 20 and len(tail) > 20
    assert L.truncate_middle(tok, text, len(ids)) == text


def test_prompt_is_cut_before_the_chat_template():
    rec = record(context="x" * 200, input="Where?")
    full = L.fill_template("hotpotqa", rec)
    ids = L.prompt_ids(BytesChat(), "hotpotqa", rec, 60, chat=True)
    # 29 characters after BOS, the last 30, then the template's markers around them, intact
    assert bytes(ids).decode() == "<u>" + full[:29] + full[-30:] + "</u>"
    # the few-shot and code tasks get no chat template: the truncated text with BOS
    rec_trec = record(context="x" * 200, input="What is it?")
    trec = L.prompt_ids(BytesChat(), "trec", rec_trec, 60, chat=True)
    assert trec[0] == BOS and bytes(trec[1:]).decode() == L.truncate_middle(Bytes(), L.fill_template(
        "trec", rec_trec), 60)
    assert L.prompt_ids(Bytes(), "hotpotqa", rec, 60, chat=True)[0] == BOS  # no template to apply
    # room: cut again until the ids fit (here the markers are 7 more ids than truncate_middle counted)
    assert len(L.prompt_ids(BytesChat(), "hotpotqa", rec, 60, chat=True, room=60)) <= 60
    with pytest.raises(ValueError, match="chunkkv.eval.longbench: a lcc record .* needs string fields context "
                                         "and input; input missing"):
        L.fill_template("lcc", {"context": "def f():", "_id": "x"})


# -- post-processing and scores ------------------------------------------------------------------------
def test_score_post_processes_as_longbench():
    classes = ["Abbreviation", "Description of something", "Food"]
    trec = record(answers=["Abbreviation"], all_classes=classes)
    # only the first line counts (after leading newlines): the second line's class would halve the score
    assert L.score("trec", "\nAbbreviation\nDescription of something", trec) == 1.0
    assert M.classification_score("Abbreviation\nDescription of something", "Abbreviation", classes) == 0.5
    assert L.score("triviaqa", "Paris\nQuestion: and Rome?", record(answers=["Paris"])) == 1.0
    # code: the first line that is no comment, whole predictions (no first-line cut)
    assert L.score("lcc", "# next\n    return x\n", record(answers=["    return x"])) == 1.0
    assert L.score("passage_retrieval_zh", "段落3", record(answers=["段落3"])) == 1.0
    assert L.score("passage_count", "5", record(answers="5")) == 1.0  # a bare string answer
    assert L.score("hotpotqa", "Paris", record(answers=["London", "paris"])) == 1.0
    assert L.score("hotpotqa", "Paris", record(answers=[])) == 0.0


def test_entries_summary_and_rescoring():
    hot = L.Example("hotpotqa", "1", record(answers=["Paris"], length=5000), False)
    hot_e = L.Example("hotpotqa", "1", record(answers=["Paris"], length=5000), True)
    assert (hot.dataset, hot_e.dataset) == ("hotpotqa", "hotpotqa_e")
    results = {}
    for ex, pred, method in ((hot, "Paris", "full"), (hot_e, "Paris", "full"), (hot_e, "Rome", "chunkkv")):
        key = C.make_key(ex.dataset, ex.id, method, "-" if method == "full" else "0.1")
        results[key] = {"method": method, "budget": "-" if method == "full" else "0.1"} | L.entry_fields(ex, pred)
    assert "bucket" not in results["hotpotqa|1|full|-"] and results["hotpotqa_e|1|full|-"]["bucket"] == "4-8k"
    assert results["hotpotqa_e|1|chunkkv|0.1"]["metric"] == "qa_f1_score"
    tables = L.summarize(results)
    assert [t[1] for t in tables] == [["method", "budget", "hotpotqa", "hotpotqa_e", "mean"],
                                      ["method", "budget", "hotpotqa_e/4-8k"]]
    assert tables[1][2] == [["full", "-", 100.0], ["chunkkv", "0.1", 0.0]]
    # an entry of an older version is rescored from its prediction, a current one is left alone
    old = dict(results["hotpotqa|1|full|-"], score=0.25)
    del old["scoring"]
    current = dict(results["hotpotqa_e|1|full|-"], score=0.5)
    stored = {"hotpotqa|1|full|-": old, "hotpotqa_e|1|full|-": current}
    assert L.rescore(stored, {"hotpotqa|1|full|-": hot, "hotpotqa_e|1|full|-": hot_e}) == 1
    assert old["score"] == 1.0 and old["scoring"] == L.SCORING and current["score"] == 0.5


def test_results_written_before_the_dataset_field_still_report():
    path = ROOT / "benchmarks" / "results" / "longbench.json"
    results = json.loads(path.read_text(encoding="utf-8"))["results"]
    (title, headers, rows), = L.summarize(results)  # no LongBench-E entries: one table
    assert "earlier version" not in title  # the committed file was rescored with the current metrics
    # an entry scored by an earlier version of the metrics is flagged, until a rerun rescores it
    old = {k: {f: v for f, v in e.items() if f != "scoring"} if i == 0 else e for i, (k, e) in enumerate(results.items())}
    assert L.summarize(old)[0][0].endswith(f"; 1 of {len(old)} entries were scored by an earlier version of the "
                                           "metrics (a rerun of the command rescores them from their stored predictions)")
    tasks = sorted({e["task"] for e in results.values()})
    assert headers == ["method", "budget", *tasks] + (["mean"] if len(tasks) > 1 else [])
    assert {r[0] for r in rows} == {e["method"] for e in results.values()}
    # their keys are the keys a rerun makes: dataset (= task for LongBench v1) | id | method | budget
    for key, e in results.items():
        assert key == C.make_key(e["task"], e["id"], e["method"], e["budget"])
