"""GSM8K's fixed 8-shot chain-of-thought exemplars (Wei et al. 2022; the default --shots-source) next to the
seeded random shots, and the results file's record of which shots were used."""
from __future__ import annotations

import json
import random
import re

import pytest

pytest.importorskip("torch")
from chunkkv.eval import gsm8k  # noqa: E402
from chunkkv.eval import harness as C  # noqa: E402
from chunkkv.eval import metrics as M  # noqa: E402

QUESTION = "A farmer has 7 cows and buys 5 more. How many cows does he have?"


def test_fixed_prompt_holds_the_eight_exemplars_in_order_and_ends_with_the_question():
    shots = gsm8k.fixed_shots()
    user = gsm8k.build_user(shots, QUESTION)
    assert user.endswith(f"Question: {QUESTION}")
    starts = []
    for q, reasoning, final in gsm8k.COT_EXEMPLARS:
        block = f"Question: {q}\nAnswer: {reasoning} The answer is {final}.\n"
        assert user.count(block) == 1, block
        starts.append(user.index(block))
    assert len(starts) == 8 and starts == sorted(starts)
    assert user.index("Question: There are 15 trees in the grove.") == starts[0]
    assert "Olivia has $23." in user[starts[-1]:]


def test_exemplar_arithmetic_and_reference():
    # every shown computation is right and the stated answer is the number it reaches
    for row in gsm8k.fixed_shots():
        ref = M.gsm8k_reference(row["answer"])
        body = row["answer"].split("####")[0]
        for a, op, b, c in re.findall(r"(\d+) ([-+*x]) (\d+) (?:=|is) (\d+)", body):
            a, b, c = int(a), int(b), int(c)
            assert {"+": a + b, "-": a - b, "*": a * b, "x": a * b}[op] == c, (a, op, b, c)
        assert M.extract_last_number(body) == ref
        assert M.gsm8k_correct(gsm8k.clean_solution(row["answer"]), ref) == 1.0


def test_fixed_shots_count_is_checked():
    assert [s["question"] for s in gsm8k.fixed_shots(3)] == [q for q, _, _ in gsm8k.COT_EXEMPLARS[:3]]
    with pytest.raises(SystemExit, match="--shots 9.*--shots-source random"):
        gsm8k.fixed_shots(9)


def _train(tmp_path, n=30):
    path = tmp_path / "train.jsonl"
    rows = [{"question": f"q{i}?", "answer": f"step {i}\n#### {i}"} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path, rows


def _args(train, **kw):
    argv = ["--train", str(train), "--heldout", "10"]
    for k, v in kw.items():
        argv += [f"--{k.replace('_', '-')}", str(v)]
    return gsm8k.parse_args(argv)


def test_shot_sources_and_evaluation_set(tmp_path):
    train, rows = _train(tmp_path)
    args = _args(train)
    assert args.shots_source == "fixed" and args.shots == 8
    shots, evalset = gsm8k.choose_shots_and_evalset(args)
    assert shots == gsm8k.fixed_shots() and evalset == rows[20:]
    # random: the seeded draw from the part outside the held-aside problems, as before the option existed
    args = _args(train, shots_source="random", shots=4, seed=3)
    shots, evalset = gsm8k.choose_shots_and_evalset(args)
    assert shots == random.Random(3).sample(rows[:20], 4) and evalset == rows[20:]


def test_store_accepts_old_random_files_only_for_random(tmp_path):
    out = tmp_path / "gsm.json"
    out.write_text(json.dumps({"script": "gsm8k", "config": {"model": "m"}, "results": {"k": {}}}))
    store = C.ResultStore(out, "gsm8k", {"model": "m", "shots_source": "random"}, strict=("model", "shots_source"),
                          old_defaults={"shots_source": "random"})
    assert "k" in store
    with pytest.raises(SystemExit, match="shots_source='random', not 'fixed'"):
        C.ResultStore(out, "gsm8k", {"model": "m", "shots_source": "fixed"}, strict=("model", "shots_source"),
                      old_defaults={"shots_source": "random"})
