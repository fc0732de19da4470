"""chunkkv-eval ruler --data: RULER's pre-generated files (index, input, outputs, length), RULER's string-match
metrics and per-task generation lengths."""
from __future__ import annotations

import json

import pytest

pytest.importorskip("torch")
from chunkkv.eval import metrics as M  # noqa: E402
from chunkkv.eval import ruler  # noqa: E402
from shared_data import stories_folder  # noqa: E402

PRED = "The special magic numbers for quiet-anchor are: 1234567, 7654321."


def test_string_match_hand_worked():
    refs = ["1234567", "7654321", "1111111"]
    assert M.string_match_all(PRED, refs) == pytest.approx(2 / 3)   # 2 of the 3 references appear
    assert M.string_match_part(PRED, refs) == 1.0                   # at least one appears
    assert M.string_match_all(PRED, ["1111111"]) == 0.0 and M.string_match_part(PRED, ["1111111"]) == 0.0
    uuid = "9F2C1E4A-77B0-4C2D-9E11-0A5B3C6D7E8F"
    assert M.string_match_all(f"the answer is {uuid.lower()}", [uuid]) == 1.0   # case-insensitive
    assert M.string_match_all(f"the answer is {uuid[:20]}", [uuid]) == 0.0      # a cut-short UUID scores 0
    assert M.string_match_part("", ["x"]) == 0.0


def test_task_lengths_and_metrics():
    assert ruler.ruler_task_config("niah_single_3") == (128, "string_match_all")
    assert ruler.ruler_task_config("niah_multivalue") == (128, "string_match_all")
    assert ruler.ruler_task_config("vt") == (30, "string_match_all")
    assert ruler.ruler_task_config("cwe") == (120, "string_match_all")
    assert ruler.ruler_task_config("fwe") == (50, "string_match_all")
    assert ruler.ruler_task_config("qa_2") == (32, "string_match_part")
    for bad in ("passkey", "niahx", "quality"):
        with pytest.raises(SystemExit, match=f"unknown RULER task '{bad}'"):
            ruler.ruler_task_config(bad)
    # qa scores with string_match_part, the others with string_match_all
    assert ruler.score_prediction("qa_1", "Paris, in France", ["paris", "Lyon"]) == 1.0
    assert ruler.score_prediction("niah_multikey_1", "Paris, in France", ["paris", "Lyon"]) == 0.5
    assert ruler.score_prediction("vt", "VAR ABCDE, VAR FGHIJ", ["ABCDE", "FGHIJ", "KLMNO", "PQRST"]) == 0.5


def test_task_from_file_or_folder(tmp_path):
    assert ruler.data_task_name(str(tmp_path / "niah_single_1.jsonl")) == "niah_single_1"
    assert ruler.data_task_name(str(tmp_path / "vt" / "validation.jsonl")) == "vt"
    assert ruler.data_task_name(str(tmp_path / "x.jsonl"), "qa_1") == "qa_1"
    with pytest.raises(SystemExit, match="--task"):
        ruler.data_task_name(str(tmp_path / "data" / "validation.jsonl"))


def test_records_are_checked(tmp_path):
    path = tmp_path / "vt.jsonl"
    path.write_text(json.dumps({"index": 0, "input": "x", "outputs": "A", "length": 9}) + "\n")
    with pytest.raises(SystemExit, match="record 0 lacks.*outputs as a list"):
        ruler.read_data(str(path))
    path.write_text(json.dumps({"index": 0, "outputs": ["A"]}) + "\n")
    with pytest.raises(SystemExit, match=r"record 0 lacks \['input'\]"):
        ruler.read_data(str(path))


def write(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_data_run_on_stories260k(tmp_path, capsys):
    model = str(stories_folder())
    story = "Once upon a time, there was a little girl named Lily. She liked to play in the park with her dog. " * 3
    niah = tmp_path / "4096" / "niah_single_1" / "validation.jsonl"
    write(niah, [{"index": i, "input": f"{story} The special magic number is {n}. What is the special magic number?",
                  "outputs": [str(n)], "length": 120, "answer_prefix": " The special magic number is"}
                 for i, n in enumerate((1234567, 7654321, 5550123))])
    qa = tmp_path / "qa_1.jsonl"
    write(qa, [{"index": 7, "input": f"{story} Who liked to play in the park?", "outputs": ["Lily", "the girl"],
                "length": 110}])
    out = tmp_path / "ruler_data.json"
    argv = ["--model", model, "--out", str(out), "--quiet", "--threads", "1", "--data", str(niah), "--data", str(qa),
            "--limit", "2", "--methods", "full,chunkkv", "--budgets", "0.5"]
    assert ruler.main(argv) == 0
    data = json.loads(out.read_text())
    res = data["results"]
    assert len(res) == (2 + 1) * 2 and data["config"]["data"] == [str(niah), str(qa)]
    for e in res.values():
        max_new, metric = ruler.ruler_task_config(e["task"])
        assert e["metric"] == metric and 1 <= e["new_tokens"] <= max_new
        assert e["finish"] in ("eos", "length") and (e["finish"] == "eos" or e["new_tokens"] == max_new)
        assert e["score"] == ruler.score_prediction(e["task"], e["prediction"], e["expected"])
    assert {(e["task"], e["index"]) for e in res.values()} == {("niah_single_1", 0), ("niah_single_1", 1),
                                                             ("qa_1", 7)}
    # a rerun resumes; a generated-task run into the same file is refused
    capsys.readouterr()
    assert ruler.main(argv) == 0
    assert "6 already in" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="was made with .*use another --out"):
        ruler.main(["--model", model, "--out", str(out), "--quiet", "--limit", "1"])
