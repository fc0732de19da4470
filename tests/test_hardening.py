"""Hardening: no crash, no leak, no wrong answer, whatever the input.

* fuzz: tests/fuzz_core.py (hypothesis) runs every public core op on random, broken and absurd
  inputs in a child process, so a segfault or a sanitizer abort fails this test with its signal
  and the case that was running; the number of cases is printed.
* leaks: 100,000 calls of each entry point (and 10,000 of each error path) leave the inputs'
  reference counts and the resident memory as they were.
* threads: 8 Python threads get the serial answers, keep their own error messages, and other
  threads run while a long kernel runs (the GIL is released).
* the patched model survives exceptions inside compression and unpatches to bit-identical outputs.

The sanitizer build (tests/sanitize.sh) and the valgrind smoke test (tests/valgrind_smoke.sh) run
this file's core parts again under ASan/UBSan and memcheck.

Knobs: CHUNKKV_FUZZ_EXAMPLES (fuzz size, default 2500), CHUNKKV_FUZZ_SEED (default: random,
printed), CHUNKKV_LEAK_CALLS (default 100000).
"""
from __future__ import annotations

import gc
import os
import re
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import chunkkv

try:
    import torch
except ImportError:
    torch = None

HERE = os.path.dirname(os.path.abspath(__file__))
SELECT_METHODS = ("chunkkv", "snapkv", "streamingllm", "random")


# ----------------------------------------------------------------------------------------- fuzz


def _signal_name(rc: int) -> str:
    try:
        return signal.Signals(-rc).name
    except ValueError:
        return f"signal {-rc}"


def test_fuzz_every_entry_point_in_a_child_process(tmp_path, capsys):
    """Random, broken and absurd inputs: the reference answer or ValueError/TypeError/BufferError."""
    last = tmp_path / "last_case.txt"
    examples = int(os.environ.get("CHUNKKV_FUZZ_EXAMPLES", "2500"))
    env = dict(os.environ, CHUNKKV_FUZZ_LAST=str(last), PYTHONFAULTHANDLER="1")
    cmd = [sys.executable, os.path.join(HERE, "fuzz_core.py"), "--examples", str(examples)]
    if "CHUNKKV_FUZZ_SEED" in os.environ:
        cmd += ["--seed", os.environ["CHUNKKV_FUZZ_SEED"]]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True,
                              timeout=float(os.environ.get("CHUNKKV_FUZZ_TIMEOUT", "600")))
    except subprocess.TimeoutExpired as e:
        case = last.read_text().strip() if last.exists() else "?"
        pytest.fail(f"fuzz child hung (timeout {e.timeout} s) while running: {case}")
    elapsed = time.perf_counter() - t0
    out = proc.stdout + proc.stderr
    counts = re.search(r"FUZZ_CASES total=(\d+)(.*)", out)
    seed = re.search(r"fuzz seed (\d+)", out)
    total = int(counts.group(1)) if counts else 0
    with capsys.disabled():
        print(f"\nchunkkv fuzz: {total} cases ({counts.group(2).strip() if counts else 'none counted'}) in "
              f"{elapsed:.1f} s, seed {seed.group(1) if seed else '?'} (child exit {proc.returncode})")
    if proc.returncode != 0:
        case = last.read_text().strip() if last.exists() else "?"
        what = (f"killed by {_signal_name(proc.returncode)}" if proc.returncode < 0
                else "a sanitizer report" if re.search(r"Sanitizer|runtime error:", out)
                else "a case hung" if re.search(r"^Timeout \(", out, re.M)
                else f"exit status {proc.returncode}")
        pytest.fail(f"fuzz child failed ({what}); last case started: {case}\n--- output tail ---\n{out[-6000:]}")
    assert total >= examples // 3, f"only {total} fuzz cases ran"


def test_thread_count_arguments():
    default = chunkkv.get_num_threads()
    try:
        for n, want in ((3, 3), (10**6, 4096), (2**62, 4096), (-4294967291, default), (-(2**63) + 1, default),
                        (0, default), (np.int64(2), 2)):
            chunkkv.set_num_threads(n)
            assert chunkkv.get_num_threads() == want, f"set_num_threads({n})"
        for bad, exc in (("2", TypeError), (2.5, TypeError), (True, TypeError), (None, TypeError), (2**64, ValueError)):
            with pytest.raises(exc):
                chunkkv.set_num_threads(bad)
        info = chunkkv.build_info()
        assert {"version", "cuda", "openmp", "simd", "threads"} <= set(info)
    finally:
        chunkkv.set_num_threads(0)
    assert chunkkv.get_num_threads() == default


# ----------------------------------------------------------------------------------------- leaks


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _tiny(rng, lib="numpy"):
    q = rng.standard_normal((1, 2, 2, 4)).astype(np.float32)
    k = rng.standard_normal((1, 1, 16, 4)).astype(np.float32)
    v = rng.standard_normal((1, 1, 16, 4)).astype(np.float32)
    if lib == "torch":
        q, k, v = (torch.from_numpy(x) for x in (q, k, v))
    return q, k, v


def _entry_points(q, k, v):
    """name -> a call of one public entry point on tiny inputs (select cycles through every method)."""
    idx = chunkkv.select(q, k, budget=6)
    kc, vc = k.copy() if isinstance(k, np.ndarray) else k.clone(), v.copy() if isinstance(v, np.ndarray) else v.clone()
    methods = [dict(method="chunkkv", chunk_size=3), dict(method="snapkv", pool_kernel=3),
               dict(method="streamingllm", n_sink=2), dict(method="random", seed=5)]
    i = [0]

    def select():
        i[0] += 1
        return chunkkv.select(q, k, budget=6, **methods[i[0] & 3])

    return {
        "select": (select, (q, k)),
        "score": (lambda: chunkkv.score(q, k, row_starts=[1]), (q, k)),
        "gather": (lambda: chunkkv.gather(k, v, idx), (k, v, idx)),
        "compact_": (lambda: chunkkv.compact_(kc, vc, idx), (kc, vc, idx)),
        "compress": (lambda: chunkkv.compress(q, k, v, budget=6), (q, k, v)),
    }


def _error_paths(q, k, v):
    """name -> a call that fails at a given stage (after some capsules are consumed, after scratch is allocated)."""
    idx = chunkkv.select(q, k, budget=6)
    bad_idx = idx.copy()
    bad_idx[0, 0] = 99
    q64 = q.astype(np.float64)
    misaligned = np.ndarray(k.shape, np.float32, np.zeros(k.nbytes + 4, np.uint8), offset=1)
    qnan = q.copy()
    qnan[0, 0, 0, 0] = np.nan
    return {
        "select: dtype (a capsule refused)": (lambda: chunkkv.select(q64, k, budget=6), TypeError),
        "select: budget < w (core check)": (lambda: chunkkv.select(q, k, budget=1), ValueError),
        "select: row_starts length (binding)": (lambda: chunkkv.select(q, k, budget=6, row_starts=[0, 0]), ValueError),
        "select: row_starts value (core, after malloc)": (lambda: chunkkv.select(q, k, budget=6, row_starts=[17]),
                                                         ValueError),
        "select: NaN scores (after scoring)": (lambda: chunkkv.select(qnan, k, budget=6), ValueError),
        "gather: index out of range": (lambda: chunkkv.gather(k, v, bad_idx), ValueError),
        "gather: misaligned values (2nd of 5 capsules)": (lambda: chunkkv.gather(k, misaligned, idx), BufferError),
        "compact_: not increasing": (lambda: chunkkv.compact_(k.copy(), v.copy(), idx[:, ::-1].copy()), ValueError),
        "score: wrong type": (lambda: chunkkv.score(q, "keys"), TypeError),
    }


def _loop(fn, n):
    for _ in range(n):
        fn()


def _loop_raising(fn, exc, n):
    for _ in range(n):
        try:
            fn()
        except exc:
            pass
        else:
            raise AssertionError("expected an exception")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc/self/statm (Linux)")
def test_no_leak_in_100k_calls_of_every_entry_point(capsys):
    n = int(os.environ.get("CHUNKKV_LEAK_CALLS", "100000"))
    rng = np.random.default_rng(0)
    chunkkv.set_num_threads(1)  # one OpenMP thread: the calls are tiny
    report = []
    try:
        for name, (fn, inputs) in _entry_points(*_tiny(rng)).items():
            _loop(fn, 2000)  # warm-up: caches, arenas, lazily built tables
            gc.collect()
            refs, rss0, t0 = [sys.getrefcount(x) for x in inputs], _rss(), time.perf_counter()
            _loop(fn, n)
            gc.collect()
            grew, dt = _rss() - rss0, time.perf_counter() - t0
            report.append(f"{name} {n} calls {dt:.1f} s rss {grew / 1024:+.0f} KiB")
            assert [sys.getrefcount(x) for x in inputs] == refs, f"{name}: reference counts of its inputs changed"
            assert grew < 2 << 20, f"{name}: resident memory grew {grew / 2**20:.1f} MiB in {n} calls"
        for name, (fn, exc) in _error_paths(*_tiny(rng)).items():
            m = max(1000, n // 10)
            _loop_raising(fn, exc, 500)
            gc.collect()
            rss0 = _rss()
            _loop_raising(fn, exc, m)
            gc.collect()
            grew = _rss() - rss0
            report.append(f"{name}: {m} failing calls rss {grew / 1024:+.0f} KiB")
            assert grew < 2 << 20, f"{name}: resident memory grew {grew / 2**20:.1f} MiB in {m} failing calls"
    finally:
        chunkkv.set_num_threads(0)
    with capsys.disabled():
        print("\nchunkkv leak check: " + "; ".join(report))


@pytest.mark.skipif(torch is None, reason="torch is not installed")
def test_no_leak_with_torch_tensors():
    """torch's DLPack deleters run (a leaked managed tensor keeps its storage alive)."""
    rng = np.random.default_rng(1)
    q, k, v = _tiny(rng, "torch")
    big = torch.zeros(1, 1, 4096, 64)  # 1 MiB: a leaked reference to it would show at once
    calls = _entry_points(q, k, v)
    n = max(1000, int(os.environ.get("CHUNKKV_LEAK_CALLS", "100000")) // 20)
    chunkkv.set_num_threads(1)
    try:
        for name, (fn, _) in calls.items():
            _loop(fn, 200)
            gc.collect()
            rss0 = _rss()
            _loop(fn, n)
            gc.collect()
            assert _rss() - rss0 < 4 << 20, f"{name}: resident memory grew with torch inputs"
        # a tensor that was handed over many times is freed when the caller drops it
        import weakref
        ref = weakref.ref(big)
        for _ in range(100):
            chunkkv.gather(big, big, torch.zeros(1, 3, dtype=torch.int64))
        del big
        gc.collect()
        assert ref() is None, "a torch tensor passed to chunkkv outlived its last Python reference"
    finally:
        chunkkv.set_num_threads(0)


# ----------------------------------------------------------------------------------------- threads


def _problem(seed, B=2, Hkv=2, G=2, w=8, L=1024, D=32):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, Hkv * G, w, D)).astype(np.float32)
    k = rng.standard_normal((B, Hkv, L, D)).astype(np.float32)
    v = rng.standard_normal((B, Hkv, L, D)).astype(np.float32)
    return q, k, v


def _work(q, k, v):
    """Every op once; the results as NumPy arrays."""
    out = [chunkkv.score(q, k), chunkkv.select(q, k, budget=64, chunk_size=8),
           chunkkv.select(q, k, budget=64, method="snapkv", pool_kernel=5, per_head=True),
           chunkkv.select(q, k, budget=64, method="random", seed=3)]
    kk, vv, idx = chunkkv.compress(q, k, v, budget=48, method="streamingllm")
    kc, vc = k.copy(), v.copy()
    ck, cv = chunkkv.compact_(kc, vc, out[1])
    return out + [kk, vv, idx, np.array(ck), np.array(cv)]


def test_eight_threads_get_the_serial_answers():
    problems = [_problem(s) for s in range(8)]
    serial = [_work(*p) for p in problems]
    barrier = threading.Barrier(8)
    failures = []

    def run(t):
        try:
            barrier.wait()
            for rep in range(12):
                got = _work(*problems[t])
                for a, b in zip(got, serial[t]):
                    if not np.array_equal(a, b):
                        failures.append(f"thread {t} repeat {rep}: a result differs from the serial one")
                # and an error whose message names this thread's own bad value
                bad = -1000 - t
                try:
                    chunkkv.select(problems[t][0], problems[t][1], budget=64, n_sink=bad, method="streamingllm")
                except ValueError as e:
                    if str(bad) not in str(e):
                        failures.append(f"thread {t}: error message {e} is not about its own n_sink {bad}")
                else:
                    failures.append(f"thread {t}: n_sink={bad} accepted")
        except Exception as e:  # noqa: BLE001
            failures.append(f"thread {t}: {type(e).__name__}: {e}")

    threads = [threading.Thread(target=run, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=120)
    assert not any(th.is_alive() for th in threads), "a thread hung"
    assert not failures, failures[:5]


def test_other_threads_run_while_a_long_kernel_runs(capsys):
    """The core releases the GIL: a counting thread keeps counting during a ~0.5 s select."""
    chunkkv.set_num_threads(1)
    try:
        rng = np.random.default_rng(0)
        L, D, G, w = 8192, 64, 4, 64

        def make(B):
            return (rng.standard_normal((B, 1 * G, w, D)).astype(np.float32),
                    rng.standard_normal((B, 1, L, D)).astype(np.float32))

        q, k = make(1)
        chunkkv.select(q, k, budget=512)  # warm up (thread pool, page faults): time the second call
        t = time.perf_counter()
        chunkkv.select(q, k, budget=512)
        one = time.perf_counter() - t
        B = int(min(320, max(1, np.ceil(0.5 / max(one, 1e-3)))))  # the faster the kernel, the larger B (k: 2 MiB a row)
        q, k = make(B)

        count, stop = [0], threading.Event()

        def counter():
            while not stop.is_set():
                count[0] += 1

        th = threading.Thread(target=counter, daemon=True)
        th.start()
        time.sleep(0.1)
        c0, t0 = count[0], time.perf_counter()
        time.sleep(0.2)  # the counting rate while this thread sleeps (holding nothing)
        rate = (count[0] - c0) / (time.perf_counter() - t0)
        c0, t0 = count[0], time.perf_counter()
        chunkkv.select(q, k, budget=512)
        dt, during = time.perf_counter() - t0, count[0] - c0
        stop.set()
        th.join()
        with capsys.disabled():
            print(f"\nchunkkv GIL: select of {dt:.2f} s, a counter thread counted {during} "
                  f"({during / max(rate * dt, 1):.0%} of its free rate)")
        assert dt > 0.1, "the kernel was too short to tell"
        assert during > 0.1 * rate * dt, f"the counter advanced {during} times in {dt:.2f} s: the GIL was held"
    finally:
        chunkkv.set_num_threads(0)


# ----------------------------------------------------------------------------------------- the patched model


@pytest.fixture(scope="module")
def llama():
    """A small random LlamaForCausalLM, a prompt, and its unpatched outputs and hook count."""
    pytest.importorskip("transformers")
    if torch is None:
        pytest.skip("torch is not installed")
    sys.path.insert(0, HERE)
    from tiny_models import tiny_model

    model = tiny_model("llama", "eager")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 128, (2, 40), generator=g)
    return model, ids, _outputs(model, ids), _hooks(model)


def _outputs(model, ids):
    with torch.no_grad():
        logits = model(ids).logits
        gen = model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
    return logits, gen


def _hooks(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def _assert_restored(model, ids, base, n_hooks):
    logits, gen = _outputs(model, ids)
    assert torch.equal(logits, base[0]), "logits differ from the unpatched model's"
    assert torch.equal(gen, base[1]), "generated tokens differ from the unpatched model's"
    assert _hooks(model) == n_hooks, "hooks left behind"
    assert getattr(model, "_chunkkv_patch", None) is None


class _Boom(Exception):
    pass


@pytest.mark.parametrize("where,exc", [("select", RuntimeError), ("gather", _Boom), ("select", KeyboardInterrupt),
                                       ("core", ValueError)])
def test_patched_model_survives_an_exception_inside_compression(llama, monkeypatch, where, exc):
    model, ids, base, n_hooks = llama
    chunkkv.unpatch(model)
    from chunkkv import ops, patching

    with chunkkv.patch(model, budget=16, window=4, chunk_size=4):
        clean = _outputs(model, ids)  # what the patched model answers when nothing goes wrong
    if where == "core":  # a method argument the C core refuses at the first prefill
        handle = chunkkv.patch(model, budget=16, window=4, chunk_size=4, method="snapkv", pool_kernel=2)
        with pytest.raises(ValueError):
            _outputs(model, ids)
        handle.remove()
    else:
        calls = [0]
        real = getattr(ops, where)

        def faulty(*args, **kwargs):  # fails in the third layer's compression, after two layers were compressed
            calls[0] += 1
            if calls[0] == 3:
                raise exc("injected failure")
            return real(*args, **kwargs)

        handle = chunkkv.patch(model, budget=16, window=4, chunk_size=4, reuse=1)
        monkeypatch.setattr(patching.ops, where, faulty)
        with pytest.raises(exc):
            _outputs(model, ids)
        monkeypatch.setattr(patching.ops, where, real)
        # still patched and usable: the next prefill compresses as if nothing had happened
        again = _outputs(model, ids)
        assert torch.equal(again[0], clean[0]) and torch.equal(again[1], clean[1])
        assert handle.stats.prefills >= 1
        chunkkv.unpatch(model)
    _assert_restored(model, ids, base, n_hooks)
    # and it can be patched again
    with chunkkv.patch(model, budget=16, window=4, chunk_size=4):
        assert torch.equal(_outputs(model, ids)[0], clean[0])
    _assert_restored(model, ids, base, n_hooks)


def test_unpatch_after_any_sequence_restores_bit_identical_outputs(llama):
    from hypothesis import HealthCheck, given, settings, strategies as st

    model, ids, _, n_hooks = llama
    chunkkv.unpatch(model)
    short = ids[:, :24]
    base = _outputs(model, short)
    configs = [dict(budget=12, window=4, chunk_size=4), dict(keep_ratio=0.5, window=4, reuse=2),
               dict(budget=10, window=2, method="snapkv", pool_kernel=3), dict(budget=8, window=4, method="streamingllm"),
               dict(budget=10, window=4, per_head=True), dict(budget=12, window=4, method="random", seed=7)]
    steps = st.lists(st.one_of(st.tuples(st.just("patch"), st.integers(0, len(configs) - 1)),
                               st.sampled_from([("unpatch",), ("remove",), ("generate",), ("forward",), ("with",)])),
                     max_size=5)

    @settings(max_examples=int(os.environ.get("CHUNKKV_PATCH_SEQUENCES", "10")), deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(steps)
    def run(seq):
        handle = None
        try:
            for step in seq:
                if step[0] == "patch":
                    if getattr(model, "_chunkkv_patch", None) is not None:
                        with pytest.raises(ValueError):
                            chunkkv.patch(model, **configs[step[1]])
                    else:
                        handle = chunkkv.patch(model, **configs[step[1]])
                elif step[0] == "unpatch":
                    chunkkv.unpatch(model)
                elif step[0] == "remove" and handle is not None:
                    handle.remove()  # twice is harmless too
                    handle.remove()
                elif step[0] == "generate":
                    _outputs(model, short)
                elif step[0] == "forward":
                    with torch.no_grad():
                        model(short)
                elif step[0] == "with" and getattr(model, "_chunkkv_patch", None) is None:
                    with chunkkv.patch(model, **configs[0]):
                        _outputs(model, short)
        finally:
            chunkkv.unpatch(model)
        _assert_restored(model, short, base, n_hooks)

    run()
