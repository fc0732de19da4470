"""Property-based fuzzing of chunkkv's public core ops: select (every method), score, gather,
compact_, compress and select_from_scores.

Run as a script (tests/test_hardening.py runs it in a child process, so a crash is a failed test
with its signal, not a dead test session):

    python tests/fuzz_core.py [--examples N] [--seed S]

Every case either returns exactly the reference answer (tests/reference.py, plain NumPy) or
raises ValueError, TypeError or BufferError (MemoryError for absurd sizes). Inputs are random:
shapes including empty dimensions and huge ones faked with zero strides, every dtype (also the
unsupported ones), contiguous, transposed, sliced (byte offsets), reversed (negative strides),
broadcast and misaligned layouts, NumPy and torch mixed, torch 'meta' tensors, NaN and Inf,
out-of-range indices and row starts, and wrong Python types for every argument. Inputs must come
back unchanged; compact_ must leave its buffers untouched when it raises.

Before each case its description is written to $CHUNKKV_FUZZ_LAST (when set), so the parent can
name the case that crashed; a case that runs longer than $CHUNKKV_FUZZ_CASE_TIMEOUT seconds (60)
is a hang: faulthandler dumps the stacks and the process exits. At the end one line
"FUZZ_CASES total=N op=n ..." is printed.
"""
from __future__ import annotations

import argparse
import collections
import faulthandler
import math
import os
import sys
import time

import numpy as np
from hypothesis import HealthCheck, given, settings, seed as hyp_seed, strategies as st

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import reference as ref  # noqa: E402

import chunkkv  # noqa: E402

try:
    import torch
except ImportError:  # the fuzz runs on NumPy alone then
    torch = None

ALLOWED = (ValueError, TypeError, BufferError, MemoryError)
COUNTS: collections.Counter = collections.Counter()
_LAST = os.environ.get("CHUNKKV_FUZZ_LAST")
_LAST_FD = os.open(_LAST, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644) if _LAST else None

FLOATS = ("float32", "float16", "bfloat16")
BAD_DTYPES = ("float64", "int32", "int64", "bool", "uint8", "complex64", "int16")
LAYOUTS = ("contiguous", "transposed", "fortran", "sliced", "reversed", "broadcast")
HUGE_REJECTED = (2**31, 2**33, 2**40, 2**62)  # >= 2^31: the core takes no such dimension
HUGE_ACCEPTED = (2**31 - 1, 2**28, 12345677)
#: what chunkkv.select takes; the reference knows REF_METHODS, the others are checked for sanity only
SELECT_METHODS = tuple(getattr(chunkkv.ops, "_CORE_METHODS", None) or ref.METHODS)
REF_METHODS = tuple(m for m in ref.METHODS if m in SELECT_METHODS)


def universal(reason: str) -> bool:
    """An invalid-input reason every method must refuse (the others depend on a method's own rules)."""
    return not reason.startswith(("budget < w", "pool_kernel", "shape", "n > L"))


#: this case draws only valid inputs (set per case): half the cases, so that valid inputs, which are
#: compared with the reference, are not drowned by the many ways to be invalid
CLEAN = False


def new_case(draw) -> None:
    global CLEAN
    CLEAN = draw(st.booleans())
    chunkkv.set_num_threads(draw(st.sampled_from([0, 0, 1, 2, 3])))


def opts(good, bad):
    """Strategy: `good` in a clean case, else `good` or `bad`."""
    return good if CLEAN else st.one_of(good, bad)


class Unbuildable(Exception):
    """The framework cannot build this input (e.g. torch has no negative strides): skip the case."""


#: a case running longer than this is a hang: dump every thread's stack and exit (status 1)
CASE_TIMEOUT = float(os.environ.get("CHUNKKV_FUZZ_CASE_TIMEOUT", "60"))


def record(op: str, desc: dict) -> None:
    COUNTS[op] += 1
    faulthandler.dump_traceback_later(CASE_TIMEOUT, exit=True)  # restarts the watchdog for this case
    if _LAST_FD is not None:
        line = f"{op} #{COUNTS[op]}: {desc!r}\n".encode()
        os.pwrite(_LAST_FD, line.ljust(4096)[:4096], 0)


# ------------------------------------------------------------------------------------ tensors


def is_torch(x) -> bool:
    return type(x).__module__.split(".")[0] == "torch"


def _np_dtype(dtype: str):
    return np.dtype(dtype)


def _torch_dtype(dtype: str):
    return getattr(torch, dtype)


def build(vals: np.ndarray, dtype: str, lib: str, layout: str, writable: bool = False):
    """A tensor of `dtype` holding vals (rounded), in `lib` ("numpy", "torch", "meta") and `layout`."""
    if lib != "numpy" and torch is None:
        raise Unbuildable("no torch")
    if lib == "numpy" and dtype == "bfloat16":
        raise Unbuildable("numpy has no bfloat16")
    shape = vals.shape
    nd = len(shape)
    if lib == "meta":
        return torch.empty(shape, dtype=_torch_dtype(dtype), device="meta")
    if layout == "broadcast":  # zero stride over dimension 1 (or 0 for 1-D): repeated values
        ax = 1 if nd > 1 else 0
        if shape[ax] == 0:
            layout = "contiguous"
        else:
            base = build(vals[(slice(None),) * ax + (slice(0, 1),)], dtype, lib, "contiguous")
            return base.expand(*shape) if lib == "torch" else np.broadcast_to(base, shape)
    if layout == "reversed" and lib == "torch":
        raise Unbuildable("torch has no negative strides")
    if layout == "misaligned":
        if lib == "torch":
            raise Unbuildable("torch will not view misaligned storage")
        isz = _np_dtype(dtype).itemsize
        buf = np.zeros(int(np.prod(shape)) * isz + isz, np.uint8)
        x = np.ndarray(shape, dtype=dtype, buffer=buf, offset=1)  # one byte past an aligned address
        with np.errstate(invalid="ignore"):
            x[...] = vals.astype(dtype) if dtype != "bool" else vals != 0
        return x
    if layout == "contiguous":
        alloc, view = shape, lambda a: a
    elif layout == "transposed" and nd >= 3:
        perm = list(range(nd))
        perm[1], perm[2] = perm[2], perm[1]
        alloc = tuple(shape[p] for p in perm)
        view = (lambda a: a.permute(*perm)) if lib == "torch" else (lambda a: a.transpose(perm))
    elif layout == "fortran":
        perm = list(range(nd))[::-1]
        alloc = tuple(shape[p] for p in perm)
        view = (lambda a: a.permute(*perm)) if lib == "torch" else (lambda a: a.transpose(perm))
    elif layout == "sliced":  # a byte offset into a bigger buffer, every other element of the last dims
        alloc = tuple(s + 1 for s in shape[:-1]) + (2 * shape[-1] + 1,)
        sl = tuple(slice(1, 1 + s) for s in shape[:-1]) + (slice(1, 1 + 2 * shape[-1], 2),)
        view = lambda a: a[sl]  # noqa: E731
    elif layout == "reversed":  # negative strides on the last two dimensions, and a byte offset
        alloc = shape
        sl = (slice(None),) * (nd - 2) + (slice(None, None, -1),) * min(nd, 2)
        view = lambda a: a[sl]  # noqa: E731
    else:
        alloc, view = shape, lambda a: a
    if lib == "torch":
        buf = torch.zeros(alloc, dtype=_torch_dtype(dtype))
        x = view(buf)
        src = torch.from_numpy(np.ascontiguousarray(vals.astype(np.float64 if dtype != "bool" else bool)))
        x.copy_(src.to(x.dtype) if dtype != "complex64" else src.to(torch.complex64))
        return x
    buf = np.zeros(alloc, dtype=dtype)
    x = view(buf)
    with np.errstate(invalid="ignore"):  # NaN/Inf into an integer dtype (an unsupported one anyway)
        x[...] = vals.astype(dtype) if dtype != "bool" else vals != 0
    return x


def raw(x) -> np.ndarray:
    """The elements' raw bits as a NumPy integer array of the same shape (a view where possible)."""
    if is_torch(x):
        size = x.element_size()
        xi = x.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[size]) if x.dtype != torch.bool \
            else x.to(torch.uint8)
        return xi.numpy()
    x = np.asarray(x)
    return x.view({1: np.uint8, 2: np.int16, 4: np.int32, 8: np.int64, 16: np.complex128}[x.itemsize]) \
        if x.dtype != np.bool_ else x.astype(np.uint8)


def numel(x) -> int:
    return int(np.prod([int(s) for s in x.shape], dtype=object))


def snapshot(x):
    """A copy of x's raw bits (None for what is not a small CPU NumPy array or strided torch tensor)."""
    if isinstance(x, np.ndarray):
        pass
    elif is_torch(x) and isinstance(x, torch.Tensor):
        if x.device.type != "cpu" or x.layout != torch.strided or x.is_conj() or x.is_complex():
            return None
    else:
        return None
    if numel(x) > 1 << 20 or x.dtype in (np.dtype(object),):
        return None
    try:
        return np.array(raw(x), copy=True)
    except (ValueError, RuntimeError, TypeError):  # e.g. an empty view whose shape NumPy cannot hold
        return None


def unchanged(x, snap) -> bool:
    return snap is None or np.array_equal(raw(x), snap)


def values(draw, rng: np.random.Generator, shape) -> tuple[np.ndarray, bool]:
    """Random float64 values; sometimes small integers (exact ties), sometimes NaN/Inf sprinkled."""
    kind = draw(st.sampled_from(["normal", "normal", "ints", "constant"]))
    if kind == "normal":
        v = rng.standard_normal(shape) * draw(st.sampled_from([0.1, 1.0, 3.0]))
    elif kind == "ints":
        v = rng.integers(-2, 3, size=shape).astype(np.float64)
    else:
        v = np.full(shape, draw(st.sampled_from([0.0, 1.0, -0.5])))
    special = False
    if not CLEAN and draw(st.integers(0, 9)) == 0 and v.size:
        n = draw(st.integers(1, 3))
        flat = v.reshape(-1)
        for _ in range(n):
            flat[rng.integers(0, flat.size)] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
        special = True
    return v, special


def dtype_st(valid_p: float = 0.93):
    """A supported float dtype mostly, an unsupported one now and then."""
    if CLEAN:
        return st.sampled_from(FLOATS)
    return st.integers(0, 99).flatmap(
        lambda u: st.sampled_from(FLOATS) if u < valid_p * 100 else st.sampled_from(BAD_DTYPES))


def lib_st():
    if CLEAN:
        return st.sampled_from(["numpy", "torch"] if torch is not None else ["numpy"])
    return st.integers(0, 99).map(lambda u: "numpy" if u < 50 else "torch" if u < 98 else "meta")


def layout_st(extra=()):
    return st.sampled_from(LAYOUTS + tuple(e for e in extra if not (CLEAN and e == "misaligned")))


def make_input(draw, rng, shape, dtype, lib, layout):
    """(tensor, values actually held as float64 or None, has NaN/Inf). Raises Unbuildable."""
    vals, special = values(draw, rng, shape)
    if layout == "broadcast" and len(shape) > 1 and shape[1] > 0:
        vals = np.broadcast_to(vals[:, :1], shape).copy()
    if lib == "numpy" and dtype == "bfloat16":
        lib = "torch"
    x = build(vals, dtype, lib, layout)
    held = None
    if dtype in FLOATS and lib != "meta":
        held = ref.to_f64(x)
        special = not np.isfinite(held).all()
    return x, held, special


class WrongDlpack:
    """Has __dlpack__ and a shape, but hands out something that is not a capsule."""

    shape = (1, 1, 1, 1)

    def __dlpack__(self, **kwargs):
        return 42


class NoShape:
    def __dlpack__(self, **kwargs):
        return np.zeros((1, 1, 1, 1), np.float32).__dlpack__(**kwargs)


def wrong_objects():
    objs = [None, 3, 1.5, "abc", [[1.0, 2.0]], {"a": 1}, np.float32(1.0), WrongDlpack(), NoShape(),
            np.zeros(()), np.zeros(3, np.float32), np.zeros((1, 1, 1, 1, 1), np.float32), object()]
    if torch is not None:
        objs += [torch.eye(3).to_sparse(), torch.zeros(2, dtype=torch.complex64).conj(), torch.tensor(1.0)]
    return objs


# ------------------------------------------------------------------------------------ helpers


def expect_raise(fn, what: str):
    try:
        fn()
    except ALLOWED as e:
        assert str(e), f"{what}: {type(e).__name__} without a message"
        return e
    except Exception as e:  # noqa: BLE001
        raise AssertionError(f"{what}: raised {type(e).__name__}: {e}, expected ValueError/TypeError/BufferError") from e
    raise AssertionError(f"{what}: accepted an invalid input (expected an exception)")


def call(fn):
    """(result, None) or (None, exception) for an allowed exception; other exceptions propagate."""
    try:
        return fn(), None
    except ALLOWED as e:
        assert str(e), f"{type(e).__name__} without a message"
        return None, e


def same_kind(out, like) -> bool:
    return is_torch(out) == is_torch(like)


def to_np(x) -> np.ndarray:
    if is_torch(x):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def int_ok(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_)) and -(2**63 - 1) <= int(v) <= 2**63 - 1


def scale_ok(s) -> bool:
    if s is None:
        return True
    if isinstance(s, (bool, np.bool_)) or not isinstance(s, (int, float, np.floating)):
        return False
    f = float(s)
    if not math.isfinite(f) or f == 0.0:
        return False
    with np.errstate(over="ignore", under="ignore"):
        f32 = np.float32(f)
    return bool(np.isfinite(f32)) and f32 != 0.0


def scale_st():
    good = st.one_of(st.none(), st.floats(0.05, 3.0), st.floats(-3.0, -0.05), st.sampled_from([1, 2, np.float32(0.5)]))
    bad = st.sampled_from([0.0, float("nan"), float("inf"), -float("inf"), 1e-50, 1e300, True, "x", 1j])
    return good if CLEAN else st.integers(0, 19).flatmap(lambda u: good if u else bad)


def qk_shapes(draw):
    """B, Hkv, G, D, L, w: small, with empty dimensions now and then."""
    B = draw(st.sampled_from([0, 1, 1, 2, 3]))
    Hkv = draw(st.sampled_from([1, 1, 2, 3]))
    G = draw(st.sampled_from([1, 1, 2, 3]))
    D = draw(st.sampled_from([1, 2, 3, 4, 8, 9, 16]))
    L = draw(st.integers(1, 40))
    w = draw(st.one_of(st.just(1), st.integers(1, min(L, 6)), st.just(L), st.integers(1, L)))
    return B, Hkv, G, D, L, w


# ------------------------------------------------------------------------------------ select / score


def qk_case(draw, rng, op: str):
    """Queries and keys (valid or not) plus what the validity rules need; None to skip."""
    B, Hkv, G, D, L, w = qk_shapes(draw)
    qshape, kshape = [B, Hkv * G, w, D], [B, Hkv, L, D]
    bad_shape = None
    mode = draw(st.integers(14 if CLEAN else 0, 99))
    huge = None
    if mode < 8:  # break a shape rule
        rule = draw(st.sampled_from(["B", "D", "Hq", "w0", "wL", "D0", "Hkv0", "ndim"]))
        if rule == "B":
            qshape[0] = B + 1
        elif rule == "D":
            qshape[3] = D + 1
        elif rule == "Hq":  # not a multiple of Hkv, or no query head at all
            qshape[1] = Hkv * G + 1 if Hkv > 1 else 0
        elif rule == "w0":
            qshape[2] = 0
        elif rule == "wL":
            qshape[2] = L + 1
        elif rule == "D0":
            qshape[3] = kshape[3] = 0
        elif rule == "Hkv0":
            kshape[1] = 0
        else:
            qshape = qshape[1:]
        bad_shape = rule
    elif mode < 14:  # a huge dimension, faked with zero strides
        huge = draw(st.sampled_from(["rejected", "rejected", "accepted_empty", "scratch"]))
        if huge == "rejected":
            which = draw(st.sampled_from(["B", "Hkv", "L", "D", "w"]))
            v = draw(st.sampled_from(HUGE_REJECTED if which not in ("B", "Hkv", "L") else (2**40, 2**62)))
            if which == "B":
                qshape[0] = kshape[0] = v
            elif which == "Hkv":
                kshape[1] = v
                qshape[1] = v
            elif which == "L":
                kshape[2] = v
            elif which == "D":
                qshape[3] = kshape[3] = v
            else:
                qshape[2] = v
        elif huge == "accepted_empty":  # B = 0: nothing to compute whatever the other sizes
            qshape[0] = kshape[0] = 0
            which = draw(st.sampled_from(["Hkv", "L", "D", "Hq"]))
            v = draw(st.sampled_from(HUGE_ACCEPTED))
            if which == "Hkv":
                kshape[1] = qshape[1] = v
            elif which == "L":
                kshape[2] = min(v, 2**28)
            elif which == "D":
                qshape[3] = kshape[3] = v
            else:
                qshape[1] = v * Hkv if v * Hkv < 2**31 else Hkv
        else:  # inside 2^31 but past the scoring scratch limits
            if draw(st.booleans()):
                kshape[2] = 2**28 + 1
            else:
                qshape[2] = kshape[2] = 2**24 + 1
    dtq, dtk = draw(dtype_st()), draw(dtype_st())
    libq, libk = draw(lib_st()), draw(lib_st())
    layq, layk = draw(layout_st(("misaligned",))), draw(layout_st(("misaligned",)))
    if huge is not None:  # only zero-stride views fit
        layq = layk = "broadcast0"
        libq = libk = draw(st.sampled_from(["numpy", "torch"])) if torch is not None else "numpy"
        if libq == "numpy" and "bfloat16" in (dtq, dtk):
            dtq = dtk = "float32"
    desc = dict(op=op, q=(qshape, dtq, libq, layq), k=(kshape, dtk, libk, layk), bad_shape=bad_shape, huge=huge)
    try:
        if huge is not None:
            q, k = fake(qshape, dtq, libq), fake(kshape, dtk, libk)
            hq = hk = None
            special = False
        else:
            q, hq, sq = make_input(draw, rng, tuple(qshape), dtq, libq, layq)
            k, hk, sk = make_input(draw, rng, tuple(kshape), dtk, libk, layk)
            special = sq or sk
    except (Unbuildable, ValueError, RuntimeError, MemoryError):
        return None
    invalid = []
    if not CLEAN and draw(st.integers(0, 29)) == 0:  # a wrong Python object for a tensor (none is 4-D float)
        obj = draw(st.sampled_from(wrong_objects()))
        if draw(st.booleans()):
            q = obj
        else:
            k = obj
        desc["wrong_object"] = repr(obj)[:60]
        invalid.append("wrong object")
    for name, x, dt, lib, lay in (("queries", q, dtq, libq, layq), ("keys", k, dtk, libk, layk)):
        if dt not in FLOATS:
            invalid.append(f"{name} dtype")
        if lib == "meta":
            invalid.append(f"{name} meta")
        if lay == "misaligned" and numel_shape(qshape if name == "queries" else kshape) > 0:
            invalid.append(f"{name} misaligned")
    invalid += [f"shape: {p}" for p in qk_shape_problems(qshape, kshape)]
    assert bool(bad_shape or huge in ("rejected", "scratch")) <= any(r.startswith("shape") for r in invalid), desc
    return dict(q=q, k=k, hq=hq, hk=hk, special=special, invalid=invalid, desc=desc, B=qshape[0] if huge else B,
                Hkv=kshape[1], L=kshape[2], w=qshape[2], D=kshape[3], huge=huge)


def qk_shape_problems(qs, ks) -> list:
    """What the spec (chunkkv.h) refuses in queries [B, Hq, w, D] and keys [B, Hkv, L, D]."""
    if len(qs) != 4 or len(ks) != 4:
        return ["rank"]
    out = [f"dim {d}" for d in list(qs) + list(ks) if not 0 <= d < 2**31]
    (B, Hq, w, D), (Bk, Hkv, L, Dk) = qs, ks
    if B != Bk or D != Dk:
        out.append("B or D differ")
    if Hkv < 1 or Hq < 1 or Hq % Hkv:
        out.append("heads")
    if D < 1:
        out.append("D = 0")
    if not 1 <= w <= L:
        out.append("w not in [1, L]")
    if Hkv >= 1 and Hq // Hkv * w > 2**24 or L > 2**28:
        out.append("scoring scratch limits")
    return out


def numel_shape(shape) -> int:
    return int(np.prod(shape, dtype=object))


def fake(shape, dtype, lib):
    """A view of `shape` over a single element (every stride 0): huge shapes without memory."""
    shape = tuple(int(s) for s in shape)
    if dtype == "bfloat16":
        if torch is None:
            raise Unbuildable("bfloat16 needs torch")
        lib = "torch"
    if lib == "torch":
        base = torch.zeros((1,) * len(shape), dtype=_torch_dtype(dtype))
        if 0 in shape:
            base = torch.zeros(tuple(0 if s == 0 else 1 for s in shape), dtype=_torch_dtype(dtype))
        return base.expand(*shape)
    base = np.zeros(tuple(0 if s == 0 else 1 for s in shape), dtype=dtype)
    return np.broadcast_to(base, shape)


def select_params(draw, L, w, B, method):
    """Keyword arguments for select and the reasons they are invalid."""
    kw, invalid = {}, []
    budget = draw(opts(st.one_of(st.integers(w, max(w, L - 1)), st.just(w), st.just(L), st.integers(L, L + 5),
                                 st.sampled_from([2**62, 2**63 - 1, np.int64(L)])),
                       st.sampled_from([w - 1, 0, -3, "3", 3.0, None, True, 2**64])))
    kw["budget"] = budget
    if not int_ok(budget):
        invalid.append("budget type")
    elif budget < w:
        invalid.append("budget < w")
    if draw(st.booleans()):
        c = draw(opts(st.one_of(st.integers(1, L + 3), st.sampled_from([1, 2**40, 2**63 - 1])),
                      st.sampled_from([0, -1, 1.5, "2"])))
        kw["chunk_size"] = c
        if not int_ok(c) or c < 1:
            invalid.append("chunk_size")
    if draw(st.booleans()):
        s = draw(scale_st())
        kw["scale"] = s
        if not scale_ok(s):
            invalid.append("scale")
    if draw(st.booleans()):
        ph = draw(opts(st.sampled_from([True, False, True, np.bool_(True)]), st.sampled_from([1, "yes"])))
        kw["per_head"] = ph
        if not isinstance(ph, (bool, np.bool_)):
            invalid.append("per_head")
    kw["method"] = method
    if method not in SELECT_METHODS:
        invalid.append("method")
    if draw(st.booleans()):
        pk = draw(opts(st.sampled_from([1, 3, 5, 7, 2**63 - 1, 2**40 + 1]), st.sampled_from([0, 2, -1, "3"])))
        kw["pool_kernel"] = pk
        if not int_ok(pk) or (method == "snapkv" and (pk < 1 or pk % 2 == 0)):
            invalid.append("pool_kernel")
    if draw(st.booleans()):
        pool = draw(opts(st.sampled_from(["avg", "max"]), st.sampled_from(["median", None])))
        kw["pool"] = pool
        if pool not in ("avg", "max"):
            invalid.append("pool")
    if draw(st.booleans()):
        ns = draw(opts(st.one_of(st.integers(0, L + 2), st.just(2**62)), st.sampled_from([-1, "4", 1.0])))
        kw["n_sink"] = ns
        if not int_ok(ns) or ns < 0:
            invalid.append("n_sink")
    if draw(st.booleans()):
        sd = draw(opts(st.one_of(st.integers(0, 2**64 - 1), st.sampled_from([2**63, 2**64 - 1])),
                       st.sampled_from([-1, 2**64, 2**80, "1", 1.0])))
        kw["seed"] = sd
        if isinstance(sd, (bool, np.bool_)) or not isinstance(sd, (int, np.integer)) or not 0 <= sd < 2**64:
            invalid.append("seed")
    if draw(st.integers(0, 2)) == 0:
        rs, ok = row_starts(draw, B, L)
        kw["row_starts"] = rs
        if not ok:
            invalid.append("row_starts")
    if method in SELECT_METHODS and method not in REF_METHODS and draw(st.booleans()):
        # the baselines' own knobs (h2o: window; chunkkv-kvpress: keep_fraction): values are theirs to judge
        win = draw(opts(st.one_of(st.integers(1, max(L, 1)), st.sampled_from([0, -1, L + 1, 2**62, 2**63 - 1])),
                        st.sampled_from(["3", 2.5, True])))
        kw["window"] = win
        if not (win is None or int_ok(win)):
            invalid.append("window type")
        kf = draw(opts(st.one_of(st.floats(1e-6, 1.0), st.sampled_from([1, 0.0, -1.0, 1.5, 1e300, 1e-300, math.inf,
                                                                         math.nan, None])),
                       st.sampled_from(["x", True, [0.5]])))
        kw["keep_fraction"] = kf
        if not (kf is None or (isinstance(kf, (int, float)) and not isinstance(kf, bool))):
            invalid.append("keep_fraction type")
    if not CLEAN and draw(st.integers(0, 49)) == 0:
        kw["bogus_argument"] = 1
        invalid.append("unknown keyword")
    return kw, invalid


def row_starts(draw, B, L):
    """(row_starts, valid?)"""
    if B > 1000:  # a huge faked batch: the case is invalid anyway
        return None, True
    kind = draw(st.integers(0, 5 if CLEAN else 9))
    if kind < 6:
        rs = [draw(st.integers(0, L)) for _ in range(B)]
        form = draw(st.sampled_from(["list", "tuple", "numpy", "torch"]))
        if form == "tuple":
            return tuple(rs), True
        if form == "numpy":
            return np.array(rs, dtype=np.int64), True
        if form == "torch" and torch is not None:
            return torch.tensor(rs, dtype=torch.int64), True
        return rs, True
    if kind == 6 and B > 0:
        rs = [draw(st.integers(0, L)) for _ in range(B)]
        rs[draw(st.integers(0, B - 1))] = draw(st.sampled_from([-1, L + 1, 2**62, -(2**62), 2**70]))
        return rs, False
    if kind == 7:
        return [0] * (B + draw(st.sampled_from([1, 2]))), False
    if kind == 8:
        return draw(st.sampled_from(["ab", 5, 1.5, {"a": 1}])), False
    if B > 0:
        return [draw(st.sampled_from([1.5, None, "1", True]))] * B, False
    return None, True


def check_select_result(out, c, kw, method):
    """Compare a successful select with the reference (given the core's own token scores)."""
    q, k = c["q"], c["k"]
    B, H, L, w = c["B"], c["Hkv"], c["L"], c["w"]
    budget = int(kw["budget"])
    n = min(budget, L)
    per_head = bool(kw.get("per_head", False))
    shape = (B, H, n) if per_head else (B, n)
    assert tuple(out.shape) == shape, f"select: shape {tuple(out.shape)}, expected {shape}"
    assert same_kind(out, k), "select: output not in the keys' framework"
    o = to_np(out)
    assert o.dtype == np.int64, o.dtype
    if c["huge"]:
        return
    rs = kw.get("row_starts")
    rs = None if rs is None else [int(v) for v in (rs.tolist() if hasattr(rs, "tolist") else rs)]
    if method not in REF_METHODS:  # a method the reference does not know: sorted, in range, window kept
        if o.size:
            assert (np.diff(o, axis=-1) > 0).all() and o.min() >= 0 and o.max() < L
        return
    needs = method in ("chunkkv", "snapkv") and budget < L and L - w > 0 and B > 0
    scores = None
    if needs:
        s = chunkkv.score(q, k, scale=kw.get("scale"), row_starts=kw.get("row_starts"))
        scores = to_np(s).astype(np.float32)
        assert np.isfinite(scores).all(), "select succeeded although the token scores are not finite"
    want = ref.select(c["hq"], c["hk"], budget=budget, chunk_size=int(kw.get("chunk_size", 10)),
                      scale=kw.get("scale"), per_head=per_head, method=method,
                      pool_kernel=int(kw.get("pool_kernel", 1)), pool=kw.get("pool", "avg"),
                      n_sink=int(kw.get("n_sink", 4)), seed=int(kw.get("seed", 0)), token_scores=scores,
                      row_starts=rs)
    assert np.array_equal(o, want), f"select differs from the reference:\n got {o.tolist()}\nwant {want.tolist()}"


def _select_case(data):
    draw = data.draw
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    new_case(draw)
    methods = SELECT_METHODS
    method = draw(st.sampled_from(methods + ("bogus", None) if draw(st.integers(0, 40)) == 0 else methods))
    c = qk_case(draw, rng, "select")
    if c is None:
        return
    kw, bad = select_params(draw, c["L"], c["w"], c["B"], method)
    invalid = c["invalid"] + bad
    desc = {**c["desc"], "kw": {k: (v if not hasattr(v, "shape") else f"array{list(v.shape)}") for k, v in kw.items()},
            "invalid": invalid}
    record("select", desc)
    snaps = (snapshot(c["q"]), snapshot(c["k"]))
    if method in SELECT_METHODS and method not in REF_METHODS:  # rules of its own: only universal ones are sure
        invalid = [r for r in invalid if universal(r)]
        if not invalid:
            out, err = call(lambda: chunkkv.select(c["q"], c["k"], **kw))
            if err is None:
                o = to_np(out)
                assert o.dtype == np.int64 and o.shape[:-1] == ((c["B"], c["Hkv"]) if kw.get("per_head") else (c["B"],))
                if o.size and not c["huge"]:
                    assert (np.diff(o, axis=-1) > 0).all() and o.min() >= 0 and o.max() < c["L"], \
                        f"{method}: indices not sorted or out of range: {o.tolist()}"
    elif invalid:
        expect_raise(lambda: chunkkv.select(c["q"], c["k"], **kw), f"select {desc}")
    else:
        out, err = call(lambda: chunkkv.select(c["q"], c["k"], **kw))
        if err is not None:
            ok = (isinstance(err, ValueError) and c["special"] and method in ("chunkkv", "snapkv")) or \
                 (isinstance(err, MemoryError) and c["huge"])
            assert ok, f"select raised {type(err).__name__}: {err} on a valid input {desc}"
        else:
            check_select_result(out, c, kw, method)
    assert unchanged(c["q"], snaps[0]) and unchanged(c["k"], snaps[1]), "select modified its inputs"


def _score_case(data):
    draw = data.draw
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    new_case(draw)
    c = qk_case(draw, rng, "score")
    if c is None:
        return
    kw, invalid = {}, list(c["invalid"])
    if draw(st.booleans()):
        kw["scale"] = draw(scale_st())
        if not scale_ok(kw["scale"]):
            invalid.append("scale")
    if draw(st.integers(0, 2)) == 0:
        kw["row_starts"], ok = row_starts(draw, c["B"], c["L"])
        if not ok:
            invalid.append("row_starts")
    desc = {**c["desc"], "kw": {k: (v if not hasattr(v, "shape") else f"array{list(v.shape)}") for k, v in kw.items()},
            "invalid": invalid}
    record("score", desc)
    snaps = (snapshot(c["q"]), snapshot(c["k"]))
    if invalid:
        expect_raise(lambda: chunkkv.score(c["q"], c["k"], **kw), f"score {desc}")
    else:
        out, err = call(lambda: chunkkv.score(c["q"], c["k"], **kw))
        if err is not None:
            assert isinstance(err, MemoryError) and c["huge"], \
                f"score raised {type(err).__name__}: {err} on a valid input {desc}"
        else:
            B, H, L, w = c["B"], c["Hkv"], c["L"], c["w"]
            assert tuple(out.shape) == (B, H, L - w), f"score: shape {tuple(out.shape)}"
            assert same_kind(out, c["k"])
            o = to_np(out)
            assert o.dtype == np.float32
            if not c["huge"]:
                rs = kw.get("row_starts")
                rs = None if rs is None else [int(v) for v in (rs.tolist() if hasattr(rs, "tolist") else rs)]
                G = c["q"].shape[1] // H if H else 1
                hq, hk = c["hq"].copy(), c["hk"].copy()
                starts = rs or [0] * B
                for b in range(B):  # what the spec masks out cannot matter: zero it for the reference
                    hk[b, :, :starts[b]] = 0.0
                    hq[b, :, :max(0, starts[b] - (L - w))] = 0.0
                with np.errstate(all="ignore"):
                    want = ref.score(hq, hk, kw.get("scale"), rs)
                tol = 2e-5 * G * w + 1e-4 * np.abs(np.nan_to_num(want))
                if c["special"]:  # a (b, g) row with NaN/Inf in sight is right or poisoned whole (all NaN)
                    for b in range(B):
                        for g in range(H):
                            row, wrow = o[b, g], want[b, g]
                            seen = np.isfinite(hk[b, g]).all() and np.isfinite(hq[b, g * G:(g + 1) * G]).all()
                            if seen or not np.isnan(row).all():
                                assert np.isfinite(wrow).all() and (np.abs(row - wrow) <= tol[b, g]).all(), \
                                    f"score row ({b}, {g}) differs: {row} vs {wrow}"
                else:
                    assert np.isfinite(o).all(), "score: non-finite scores from finite inputs"
                    assert (np.abs(o - want) <= tol).all(), \
                        f"score differs from the reference by {np.abs(o - want).max()}"
    assert unchanged(c["q"], snaps[0]) and unchanged(c["k"], snaps[1]), "score modified its inputs"


# ------------------------------------------------------------------------------------ gather / compact_


def kv_case(draw, rng, op: str, writable: bool):
    B = draw(st.sampled_from([0, 1, 1, 2, 3]))
    H = draw(st.sampled_from([0, 1, 1, 2, 3]))
    L = draw(st.sampled_from([0, 1, 2, 5, 9, 17, 33]))
    D = draw(st.sampled_from([0, 1, 2, 3, 4, 8, 9]))
    kshape = [B, H, L, D]
    vshape = list(kshape)
    invalid = []
    huge = None
    mode = draw(st.integers(12 if CLEAN else 0, 99))
    if mode < 4:
        vshape[draw(st.integers(0, 3))] += 1
        invalid.append("values shape")
    elif mode < 5:
        kshape = vshape = kshape[:3]
        invalid.append("ndim")
    elif mode < 12 and not writable:  # huge dimensions, faked with zero strides
        huge = draw(st.sampled_from(["L", "L", "rejected", "empty"]))
        if huge == "L":  # a huge cache: gather reads only the kept rows
            kshape[2] = vshape[2] = draw(st.sampled_from(HUGE_ACCEPTED))
            kshape[0] = vshape[0] = max(B, 1)
            kshape[1] = vshape[1] = max(H, 1)
            kshape[3] = vshape[3] = max(D, 1)
        elif huge == "rejected":
            i = draw(st.integers(0, 3))
            kshape[i] = vshape[i] = draw(st.sampled_from(HUGE_REJECTED if i in (2,) else (2**40, 2**62)))
            invalid.append("huge dimension")
        else:  # accepted huge sizes with nothing to copy
            i = draw(st.integers(0, 3))
            kshape[i] = vshape[i] = draw(st.sampled_from(HUGE_ACCEPTED))
            j = draw(st.sampled_from([x for x in range(4) if x != i]))
            kshape[j] = vshape[j] = 0
    dtk = draw(dtype_st())
    dtv = dtk if CLEAN else draw(st.one_of(st.just(dtk), dtype_st()))
    libk, libv = draw(lib_st()), draw(lib_st())
    layk, layv = draw(layout_st(("misaligned",))), draw(layout_st(("misaligned",)))
    fused = False
    if writable:  # compact_ writes into keys and values: no read-only or repeating views
        layk, layv = draw(st.sampled_from(["contiguous", "transposed", "fortran", "sliced", "reversed", "fused"])), None
        if layk == "fused":
            fused = True
        if not CLEAN and draw(st.integers(0, 19)) == 0:
            layk, fused = draw(st.sampled_from(["broadcast", "misaligned"])), False
        layv = layv or draw(st.sampled_from(["contiguous", "transposed", "sliced", "reversed"]))
        if libk == "meta" and draw(st.booleans()):
            libk = "torch"
    desc = dict(op=op, k=(kshape, dtk, libk, layk), v=(vshape, dtv, libv, layv), huge=huge)
    try:
        if huge is not None:
            k, v = fake(kshape, dtk, libk if libk != "meta" else "numpy"), fake(vshape, dtv, libv if libv != "meta" else "numpy")
            libk, libv = ("torch" if is_torch(k) else "numpy"), ("torch" if is_torch(v) else "numpy")
            layk = layv = "broadcast0"
            desc["k"], desc["v"] = (kshape, dtk, libk, layk), (vshape, dtv, libv, layv)
            hk = hv = None
        elif fused and libk != "meta" and len(kshape) == 4:  # keys and values: the two halves of one buffer along D
            if libk == "numpy" and dtk == "bfloat16":
                libk = "torch"
            if vshape != kshape:
                raise Unbuildable("fused needs equal shapes")
            vals = rng.standard_normal(tuple(kshape[:3]) + (2 * kshape[3],))
            both = build(vals, dtk, libk, "contiguous")
            k, v = both[..., :kshape[3]], both[..., kshape[3]:]
            dtv, libv = dtk, libk
            hk = hv = None
            if dtk in FLOATS:
                hk, hv = ref.to_f64(k), ref.to_f64(v)
        else:
            k, hk, _ = make_input(draw, rng, tuple(kshape), dtk, libk, layk)
            v, hv, _ = make_input(draw, rng, tuple(vshape), dtv, libv, layv)
    except (Unbuildable, ValueError, RuntimeError, MemoryError):
        return None
    for name, x, dt, lib, lay, shape in (("keys", k, dtk, libk, layk, kshape), ("values", v, dtv, libv, layv, vshape)):
        lib = ("meta" if x.device.type == "meta" else "torch") if is_torch(x) else "numpy"  # as built
        if dt not in FLOATS:
            invalid.append(f"{name} dtype")
        if lib == "meta":
            invalid.append(f"{name} meta")
        if lay == "misaligned" and numel_shape(shape) > 0:
            invalid.append(f"{name} misaligned")
        if name == "values" and dt != dtk and dt in FLOATS and dtk in FLOATS:
            invalid.append("values dtype differs from keys")  # chunkkv.h: keys and values have one dtype
        if writable and lay == "broadcast" and len(shape) == 4 and shape[1] > 0 and lib != "meta":
            invalid.append(f"{name} read-only or repeating")  # NumPy broadcasts are read-only
    return dict(k=k, v=v, hk=hk, hv=hv, invalid=invalid, desc=desc, shape=kshape, huge=huge, libk=libk)


def indices_case(draw, rng, shape, increasing: bool, lib_like: str):
    """An index tensor for keys of `shape` [B, H, L, D], and the reasons it is invalid."""
    B, H, L = (shape + [1, 1, 1])[:3] if len(shape) < 4 else shape[:3]
    per_head = draw(st.booleans())
    n = min(draw(st.one_of(st.integers(0, min(L, 64)), st.integers(0, 6))), L + 2)
    rows = (B, H) if per_head else (B,)
    invalid = []
    if numel_shape(rows) > 1 << 16:  # a huge faked batch or head count: only empty index rows
        n = 0
    if numel_shape(rows) * n > 1 << 16:
        return None
    kind = draw(st.integers(2 if CLEAN else 0, 9))
    lay = draw(st.sampled_from(["contiguous", "sliced", "reversed", "transposed", "broadcast"]))
    try:
        idx = np.zeros(tuple(rows) + (n,), np.int64)
    except ValueError:  # NumPy cannot describe this many rows, even empty ones
        return None
    for r in (np.ndindex(*rows) if idx.size else ()):
        if increasing and n <= L:
            idx[r] = np.sort(rng.choice(L, size=n, replace=False))
        elif L > 0:
            idx[r] = rng.integers(0, L, size=n)
    if idx.size == 0:
        lay = "contiguous"  # (a padded buffer of a huge empty shape would not be empty)
    if lay == "broadcast":  # every batch row the same (zero stride over B)
        idx[...] = idx[:1]
    size = idx.size
    if increasing and n > L:  # compact_: the front n rows of the cache cannot hold n rows
        invalid.append("n > L")
    if L == 0 and size:
        invalid.append("index into an empty cache")
    if kind == 0 and size:
        flat = idx.reshape(-1)
        at = rng.integers(0, size // idx.shape[0] if lay == "broadcast" else size)
        flat[at] = draw(st.sampled_from([-1, L, L + 7, 2**62, -(2**63)]))
        if lay == "broadcast":
            idx[...] = idx[:1]
        invalid.append("out of range")
    elif kind == 1 and increasing and n >= 2 and size:
        idx[..., 1] = idx[..., 0]
        invalid.append("not increasing")
    dt = "int64"
    if not CLEAN and draw(st.integers(0, 19)) == 0:
        dt = draw(st.sampled_from(["int32", "uint64", "float32", "float64", "int16", "bool"]))
        invalid.append("indices dtype")
    lib = draw(st.sampled_from(["numpy", "torch", "same"]))
    if lib == "same":
        lib = lib_like if lib_like in ("numpy", "torch") else "numpy"
    if lib == "torch" and (torch is None or dt == "uint64"):
        lib = "numpy"
    try:
        if lib == "torch":
            t = build(idx.astype(np.float64), dt, "torch", lay) if dt != "int64" else _exact_torch(idx, lay)
        else:
            t = _exact_numpy(idx, dt, lay)
    except (Unbuildable, RuntimeError, ValueError, MemoryError, OverflowError):
        return None
    return t, idx, invalid, per_head, n


def _exact_numpy(idx, dt, lay):
    if lay == "contiguous":
        return idx.astype(dt)
    if lay == "sliced":
        buf = np.full(tuple(s + 1 for s in idx.shape[:-1]) + (2 * idx.shape[-1] + 1,), 5, dtype=dt)
        x = buf[tuple(slice(1, None) for _ in idx.shape[:-1]) + (slice(1, None, 2),)]
        x[...] = idx.astype(dt)
        return x
    if lay == "reversed":
        return np.ascontiguousarray(idx[..., ::-1]).astype(dt)[..., ::-1]
    if lay == "transposed":
        return np.asfortranarray(idx.astype(dt))
    if lay == "broadcast":
        return np.broadcast_to(idx[:1].astype(dt), idx.shape) if idx.shape[0] else idx.astype(dt)
    return idx.astype(dt)


def _exact_torch(idx, lay):
    if lay == "reversed":
        lay = "sliced"
    t = torch.from_numpy(_exact_numpy(idx, "int64", lay if lay != "broadcast" else "contiguous").copy())
    if lay == "sliced":
        buf = torch.full(tuple(s + 1 for s in idx.shape[:-1]) + (2 * idx.shape[-1] + 1,), -5, dtype=torch.int64)
        x = buf[tuple(slice(1, None) for _ in idx.shape[:-1]) + (slice(1, None, 2),)]
        x.copy_(torch.from_numpy(idx))
        return x
    if lay == "broadcast" and idx.shape[0]:
        return torch.from_numpy(idx[:1].copy()).expand(*idx.shape)
    if lay == "transposed":
        rev = tuple(range(idx.ndim))[::-1]
        return torch.from_numpy(np.ascontiguousarray(idx.transpose(rev))).permute(*rev)
    return t


def gather_ref(x, idx: np.ndarray) -> np.ndarray:
    """Reference rows of x (raw bits) for indices idx [B, n] or [B, H, n]."""
    r = raw(x)
    B, H, L, D = r.shape
    if idx.ndim == 2:
        idx = np.broadcast_to(idx[:, None, :], (B, H, idx.shape[-1]))
    if r.size == 0 or idx.size == 0:
        return np.zeros((B, H, idx.shape[-1], D), r.dtype)
    # rows one by one (a view over a huge zero-stride cache must not be materialised)
    out = np.empty((B, H, idx.shape[-1], D), r.dtype)
    for b in range(B):
        for g in range(H):
            out[b, g] = r[b, g][idx[b, g]]
    return out


def out_case(draw, k, v, n, invalid):
    """out= for gather: None, a pair of buffers in any layout, or something wrong (reasons appended to
    invalid); "skip" when the framework cannot build it."""
    if draw(st.integers(0, 9)) < 5:
        return None
    B, H, _, D = (int(s) for s in k.shape)
    if max(B, H, D) >= 1 << 20:
        return None  # (buffers for faked huge shapes: the default outputs do)
    shape = (B, H, n, D)

    def buf(like, lay, shp=shape, dt=None):
        dt = dt or str(like.dtype).replace("torch.", "")
        return build(np.full(shp, 0.25), dt, "torch" if is_torch(like) else "numpy", lay)

    lays = ("contiguous", "transposed", "fortran", "sliced", "reversed")
    try:
        ko, vo = buf(k, draw(st.sampled_from(lays))), buf(v, draw(st.sampled_from(lays)))
        bad = draw(st.integers(5 if CLEAN else 0, 9))
        if bad == 0:
            ko = buf(k, "contiguous", (B, H, n + 1, D))
            invalid.append("out shape")
        elif bad == 1:  # repeating rows: read-only in NumPy, a zero stride over heads in torch
            ko = buf(k, "broadcast")
            if (not is_torch(ko) and H > 0) or (is_torch(ko) and H > 1 and numel_shape(shape) > 0):
                invalid.append("out read-only or zero stride")  # (an empty output writes nothing)
        elif bad == 2 and numel_shape(shape) > 0:
            vo = ko
            invalid.append("shared outputs")
        elif bad == 3:
            ko = buf(k, "contiguous", dt="float32" if str(k.dtype).endswith("float16") else "float16")
            invalid.append("out dtype")
        elif bad == 4:
            invalid.append("out not a pair")
            return draw(st.sampled_from([(ko,), [ko, vo, vo], "ab", 3]))
    except (Unbuildable, RuntimeError, ValueError, MemoryError):
        return "skip"
    return (ko, vo) if draw(st.booleans()) else [ko, vo]


def _gather_case(data):
    draw = data.draw
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    new_case(draw)
    c = kv_case(draw, rng, "gather", writable=False)
    if c is None:
        return
    shape = c["shape"]
    ic = indices_case(draw, rng, list(shape) + [1] * (4 - len(shape)), False, c["libk"])
    if ic is None:
        return
    idx_t, idx, bad_idx, per_head, n = ic
    invalid = c["invalid"] + bad_idx
    out = out_case(draw, c["k"], c["v"], n, invalid) if len(shape) == 4 else None
    if isinstance(out, str) and out == "skip":
        return
    args = [c["k"], c["v"], idx_t]
    if not CLEAN and draw(st.integers(0, 29)) == 0:
        i = draw(st.integers(0, 2))
        args[i] = draw(st.sampled_from(wrong_objects()))
        invalid.append(f"wrong object {i}")
    desc = {**c["desc"], "indices": (list(idx.shape), str(idx_t.dtype)), "out": None if out is None else "given",
            "invalid": invalid}
    record("gather", desc)
    snaps = [snapshot(a) for a in args]
    kw = {} if out is None else {"out": out}
    if invalid:
        expect_raise(lambda: chunkkv.gather(*args, **kw), f"gather {desc}")
    else:
        res, err = call(lambda: chunkkv.gather(*args, **kw))
        assert err is None or (isinstance(err, MemoryError) and c["huge"]), \
            f"gather raised {type(err).__name__}: {err} on a valid input {desc}"
        if err is None:
            ko, vo = res
            if out is not None:
                assert ko is out[0] and vo is out[1], "gather(out=...) did not return its buffers"
            for got, src, name in ((ko, c["k"], "keys"), (vo, c["v"], "values")):
                assert tuple(got.shape) == (shape[0], shape[1], n, shape[3]), f"gather {name}: shape {got.shape}"
                assert same_kind(got, src) and got.dtype == src.dtype
                assert np.array_equal(raw(got), gather_ref(src, idx)), f"gather {name} differs from the reference"
    for a, s in zip(args, snaps):
        assert unchanged(a, s), "gather modified its inputs"


def _compact_case(data):
    draw = data.draw
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    new_case(draw)
    c = kv_case(draw, rng, "compact_", writable=True)
    if c is None:
        return
    shape = list(c["shape"]) + [1] * (4 - len(c["shape"]))
    ic = indices_case(draw, rng, shape, True, c["libk"])
    if ic is None:
        return
    idx_t, idx, bad_idx, per_head, n = ic
    invalid = c["invalid"] + bad_idx
    k, v = c["k"], c["v"]
    if not CLEAN and draw(st.integers(0, 29)) == 0:
        v = k  # one buffer for keys and values: the two outputs would share memory
        invalid = [r for r in invalid if not r.startswith("values")]
        if numel_shape([shape[0], shape[1], min(n, shape[2]), shape[3]]) > 0:
            invalid.append("keys is values")
    desc = {**c["desc"], "indices": (list(idx.shape), str(idx_t.dtype)), "invalid": invalid}
    record("compact_", desc)
    before_k, before_v, idx_snap = snapshot(k), snapshot(v), snapshot(idx_t)
    numel_out = numel_shape([shape[0], shape[1], n, shape[3]])
    if "keys read-only or repeating" in invalid and is_torch(k) and (shape[1] < 2 or numel_out == 0):
        invalid.remove("keys read-only or repeating")  # torch: a zero stride only matters when rows are written
    if "not increasing" in invalid and numel_out == 0:
        invalid.remove("not increasing")  # nothing is moved: the order cannot matter
    if invalid:
        expect_raise(lambda: chunkkv.compact_(k, v, idx_t), f"compact_ {desc}")
        assert unchanged(k, before_k) and unchanged(v, before_v), "compact_ wrote into its buffers and then raised"
    else:
        res, err = call(lambda: chunkkv.compact_(k, v, idx_t))
        assert err is None, f"compact_ raised {type(err).__name__}: {err} on a valid input {desc}"
        ko, vo = res
        for got, whole, snap, name in ((ko, k, before_k, "keys"), (vo, v, before_v, "values")):
            assert tuple(got.shape) == (shape[0], shape[1], n, shape[3]), f"compact_ {name}: shape {got.shape}"
            if snap is None or numel_out == 0:
                continue
            # the kept rows come to the front; the rows behind them stay as they were
            want = gather_ref(snap, idx)
            assert np.array_equal(raw(got), want), f"compact_ {name} differs from the reference"
            assert np.array_equal(raw(whole)[:, :, n:], snap[:, :, n:]), f"compact_ {name} touched rows past n"
    assert unchanged(idx_t, idx_snap), "compact_ modified its indices"


def _compress_case(data):
    draw = data.draw
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    new_case(draw)
    method = draw(st.sampled_from(REF_METHODS))
    c = qk_case(draw, rng, "compress")
    if c is None or c["huge"]:
        return
    kw, bad = select_params(draw, c["L"], c["w"], c["B"], method)
    invalid = c["invalid"] + bad
    k = c["k"]
    dtv = "same" if CLEAN else draw(st.one_of(st.just("same"), dtype_st()))
    try:
        if not (isinstance(k, np.ndarray) or is_torch(k)) or k.ndim != 4:
            v = np.zeros((1, 1, 1, 1), np.float32)
        else:
            kshape = tuple(int(s) for s in k.shape)
            dt = str(k.dtype).replace("torch.", "") if dtv == "same" else dtv
            lib = "meta" if is_torch(k) and k.device.type == "meta" else "torch" if is_torch(k) else "numpy"
            v, _, _ = make_input(draw, rng, kshape, dt, lib if draw(st.booleans()) else "numpy",
                                 draw(layout_st()))
            if dt not in FLOATS or dt != str(k.dtype).replace("torch.", ""):
                invalid.append("values dtype")
            if lib == "meta" and is_torch(v) and v.device.type == "meta":
                invalid.append("values meta")
    except (Unbuildable, ValueError, RuntimeError):
        return
    desc = {**c["desc"], "kw": {a: (b if not hasattr(b, "shape") else f"array{list(b.shape)}") for a, b in kw.items()},
            "v": (str(getattr(v, "dtype", "?")), type(v).__module__), "invalid": invalid}
    record("compress", desc)
    if invalid:
        expect_raise(lambda: chunkkv.compress(c["q"], k, v, **kw), f"compress {desc}")
        return
    res, err = call(lambda: chunkkv.compress(c["q"], k, v, **kw))
    if err is not None:
        assert isinstance(err, ValueError) and c["special"] and method in ("chunkkv", "snapkv"), \
            f"compress raised {type(err).__name__}: {err} on a valid input {desc}"
        return
    ko, vo, idx = res
    want_idx, err2 = call(lambda: chunkkv.select(c["q"], k, **kw))
    assert err2 is None and np.array_equal(to_np(idx), to_np(want_idx)), "compress: indices differ from select"
    assert np.array_equal(raw(ko), gather_ref(k, to_np(idx))) and np.array_equal(raw(vo), gather_ref(v, to_np(idx)))


def _select_from_scores_case(data):
    """select_from_scores: given scores [B, P] or [B, Hkv, P] in any layout and dtype, lengths below P,
    budgets below the window, methods that do not select from scores, NaN/Inf, bad row starts."""
    draw = data.draw
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    new_case(draw)
    invalid = []
    per_head = draw(st.booleans())
    B, H, P = draw(st.integers(0, 3)), draw(st.integers(1, 4)), draw(st.sampled_from([0, 1, 2, 7, 30, 129]))
    shape = (B, H, P) if per_head else (B, P)
    dtype = draw(opts(st.just("float32"), st.sampled_from(("float16", "bfloat16", "float64", "int64"))))
    if dtype != "float32":
        invalid.append("dtype")
    lib = draw(lib_st())
    if lib == "meta":
        lib = "numpy"
    layout = draw(st.sampled_from(("contiguous", "transposed", "fortran", "sliced", "reversed", "broadcast")))
    try:
        scores, held, special = make_input(draw, rng, shape, dtype if dtype != "int64" else "float32", lib, layout)
        if dtype == "int64":
            scores = scores.to(torch.int64) if is_torch(scores) else scores.astype(np.int64)
    except Unbuildable:
        return
    w = draw(st.sampled_from([0, 1, 3, 8]))
    length = P + w
    if not CLEAN and draw(st.integers(0, 9)) == 0:
        length = draw(st.sampled_from([P - 1, -1, 2**31])) if P > 0 else -1
        invalid.append("length")
    methods = ("chunkkv", "snapkv", "pyramidkv", "h2o")
    method = draw(opts(st.sampled_from(methods), st.sampled_from(methods + ("streamingllm", "random",
                                                                             "chunkkv-kvpress", "x"))))
    if method not in methods:
        invalid.append("method")
    budget = draw(st.sampled_from([w, w + 1, w + 5, length, length + 3, 10**12]))
    if not CLEAN and draw(st.integers(0, 9)) == 0:
        budget = w - 1
        invalid.append("budget < w")
    if special and dtype == "float32" and B > 0 and min(budget, length) > 0:
        invalid.append("not finite")  # (an empty selection reads no scores)
    kw = dict(length=length, budget=budget, method=method)
    if method == "chunkkv":
        kw["chunk_size"] = draw(opts(st.sampled_from([1, 2, 3, 10, P + 1, 2**62]), st.sampled_from([0, -1])))
        if kw["chunk_size"] < 1:
            invalid.append("chunk_size")
    elif method in ("snapkv", "pyramidkv"):
        kw["pool_kernel"] = draw(opts(st.sampled_from([1, 3, 5, 2 * P + 1]), st.sampled_from([0, 2, -3])))
        kw["pool"] = draw(st.sampled_from(["avg", "max"]))
        if kw["pool_kernel"] < 1 or kw["pool_kernel"] % 2 == 0:
            invalid.append("pool_kernel")
    rs, rs_ok = row_starts(draw, B, max(length, 0))
    if not rs_ok:
        invalid.append("row_starts")
    kw["row_starts"] = rs
    desc = {"op": "select_from_scores", "scores": (list(shape), dtype, lib, layout), "kw": {k: v for k, v in kw.items()
                                                                                             if k != "row_starts"},
            "invalid": invalid}
    record("select_from_scores", desc)
    snap = snapshot(scores)
    if invalid:
        expect_raise(lambda: chunkkv.select_from_scores(scores, **kw), f"select_from_scores {desc}")
    else:
        res, err = call(lambda: chunkkv.select_from_scores(scores, **kw))
        assert err is None, f"select_from_scores raised {type(err).__name__}: {err} on a valid input {desc}"
        assert same_kind(res, scores)
        starts = None if rs is None else [int(x) for x in (rs.tolist() if hasattr(rs, "tolist") else rs)]
        want = ref.select_from_scores(held.astype(np.float32), length, budget=budget,
                                      method="snapkv" if method == "pyramidkv" else method,
                                      chunk_size=kw.get("chunk_size", 10), pool_kernel=kw.get("pool_kernel", 1),
                                      pool=kw.get("pool", "avg"), row_starts=starts)
        assert np.array_equal(to_np(res), want), f"select_from_scores differs from the reference {desc}"
    assert unchanged(scores, snap), "select_from_scores modified its scores"


# ------------------------------------------------------------------------------------ driver

OPS = {"select": _select_case, "score": _score_case, "gather": _gather_case, "compact_": _compact_case,
       "compress": _compress_case, "select_from_scores": _select_from_scores_case}
WEIGHTS = {"select": 3, "score": 2, "gather": 3, "compact_": 2, "compress": 1, "select_from_scores": 1}


def run(examples: int, seed: int, ops=None) -> None:
    ops = ops or list(OPS)
    total_w = sum(WEIGHTS[o] for o in ops)
    for name in ops:
        n = max(20, examples * WEIGHTS[name] // total_w)
        test = settings(max_examples=n, deadline=None, database=None, derandomize=False,
                        suppress_health_check=list(HealthCheck), print_blob=True)(
            hyp_seed(seed)(given(st.data())(OPS[name])))
        t0 = time.perf_counter()
        test()
        print(f"fuzz {name}: {COUNTS[name]} cases in {time.perf_counter() - t0:.1f} s", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=int(os.environ.get("CHUNKKV_FUZZ_EXAMPLES", "3000")))
    ap.add_argument("--seed", type=int, default=int(os.environ.get("CHUNKKV_FUZZ_SEED", str(int(time.time()) % 100000))))
    ap.add_argument("--ops", nargs="*", default=None, choices=list(OPS))
    args = ap.parse_args()
    faulthandler.enable()
    print(f"fuzz seed {args.seed} (rerun with --seed {args.seed}), build {chunkkv.build_info()}", flush=True)
    try:
        run(args.examples, args.seed, args.ops)
    finally:
        faulthandler.cancel_dump_traceback_later()
        chunkkv.set_num_threads(0)
        print("FUZZ_CASES total=%d %s" % (sum(COUNTS.values()), " ".join(f"{k}={v}" for k, v in COUNTS.items())),
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
