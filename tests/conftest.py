"""Shared helpers for the core-op tests: tensors in many layouts and dtypes, and a tally of the
random cases compared (printed at the end of the session)."""
from __future__ import annotations

import collections

import numpy as np
import pytest

try:
    import torch
except ImportError:  # the core tests run on NumPy alone; torch-only cases skip
    torch = None

import reference as ref

#: random cases compared against the reference, by kind; near-ties accepted, as (test, gap) pairs
TALLY = {"cases": collections.Counter(), "near_ties": []}

DTYPES = ("float32", "float16", "bfloat16")
#: how a [B, H, L, D] view is laid out in memory
LAYOUTS = ("contiguous", "bhld_T", "step", "reversed", "broadcast", "fortran")


@pytest.fixture
def tally():
    return TALLY


def pytest_terminal_summary(terminalreporter):
    cases = TALLY["cases"]
    if not cases:
        return
    near = TALLY["near_ties"]
    parts = ", ".join(f"{k} {v}" for k, v in sorted(cases.items()))
    terminalreporter.write_line(
        f"chunkkv: {sum(cases.values())} random cases compared with the reference ({parts}); "
        f"{len(near)} selection rows differed from the float64 reference at a near-tie"
        + (f" (largest relative gap {max(g for _, g in near):.2e})" if near else ""))


def need_torch():
    if torch is None:
        pytest.skip("torch is not installed")


def lib_for(dtype: str, rng) -> str:
    """numpy or torch at random; bfloat16 only exists in torch."""
    if torch is None:
        return "numpy"
    return "torch" if dtype == "bfloat16" or rng.random() < 0.5 else "numpy"


def _alloc(shape, dtype: str, lib: str, fill=0.0):
    if lib == "torch":
        return torch.full(tuple(int(s) for s in shape), fill, dtype=getattr(torch, dtype))
    return np.full(shape, fill, dtype=dtype)


def make(vals: np.ndarray, dtype="float32", lib="numpy", layout="contiguous"):
    """A [B, H, L, D] tensor holding vals (rounded to dtype) in the given memory layout, and a
    float64 NumPy copy of exactly the values it holds."""
    if lib == "numpy" and dtype == "bfloat16":
        raise ValueError("numpy has no bfloat16")
    B, H, L, D = vals.shape
    if layout == "broadcast":  # stride 0 over heads
        base = make(vals[:, :1], dtype, lib, "contiguous")[0]
        view = base.expand(B, H, L, D) if lib == "torch" else np.broadcast_to(base, (B, H, L, D))
        return view, ref.to_f64(view)
    if layout == "reversed" and lib == "torch":  # torch has no negative strides
        layout = "step"
    if layout == "contiguous":
        view = _alloc((B, H, L, D), dtype, lib)
    elif layout == "bhld_T":  # stored as [B, L, H, D], as attention projections produce it
        view = _alloc((B, L, H, D), dtype, lib)
        view = view.transpose(1, 2) if lib == "torch" else view.swapaxes(1, 2)
    elif layout == "step":  # every other token, every third feature of a bigger buffer
        view = _alloc((B, H, 2 * L + 1, 3 * D), dtype, lib)[:, :, 1::2, 1::3]
    elif layout == "reversed":  # negative strides along tokens
        view = _alloc((B, H, L, D), dtype, lib)[:, :, ::-1]
    elif layout == "fortran":  # every stride reversed
        view = _alloc((D, L, H, B), dtype, lib)
        view = view.permute(3, 2, 1, 0) if lib == "torch" else view.transpose(3, 2, 1, 0)
    else:
        raise ValueError(layout)
    if lib == "torch":
        view.copy_(torch.from_numpy(np.ascontiguousarray(vals)))
    else:
        view[...] = vals
    return view, ref.to_f64(view)


def make_indices(idx: np.ndarray, lib="numpy", layout="contiguous"):
    """An int64 index tensor [B, n] or [B, H, n] holding idx, contiguous or strided."""
    idx = np.asarray(idx, dtype=np.int64)
    if layout == "step":
        shape = idx.shape[:-1] + (2 * idx.shape[-1] + 1,)
        buf = np.full(shape, -7, dtype=np.int64)
        view = buf[..., 1::2]
        view[...] = idx
    elif layout == "transposed" and idx.ndim == 3:
        view = np.ascontiguousarray(idx.transpose(0, 2, 1)).transpose(0, 2, 1)
    else:
        view = idx.copy()
    return torch.from_numpy(view) if lib == "torch" else view


def to_numpy(x) -> np.ndarray:
    """A NumPy copy of an output (bfloat16 upcast to float32)."""
    if type(x).__module__.split(".")[0] == "torch":
        if x.dtype == torch.bfloat16:
            x = x.float()
        return x.detach().cpu().numpy().copy()
    return np.array(x, copy=True)


def bits(x) -> np.ndarray:
    """The raw bytes of a tensor's elements, for unchanged-input checks that see NaNs and -0.0."""
    if type(x).__module__.split(".")[0] == "torch":
        x = x.detach().cpu()
        x = (x.view(torch.int16) if x.dtype == torch.bfloat16 else x).numpy()  # same-size view: any strides
    return np.ascontiguousarray(x).view(np.uint8).copy()


def random_shape(rng, cost=1.0e6):
    """A random problem size: B, Hkv, G, D, L, w, with B * Hq * w * L (the reference's logits)
    kept under cost. L spans 1 to 3000; w is often 1, sometimes L, usually small."""
    B = int(rng.integers(1, 4))
    Hkv, G = int(rng.choice([1, 2, 3, 4, 8])), int(rng.choice([1, 2, 3, 4, 8]))
    D = int(rng.choice([5, 8, 16, 24, 32, 33, 64, 128]))  # odd D: the bf16 kernels pair neighbouring d
    u = rng.random()
    L = int(rng.integers(1, 41) if u < 0.3 else rng.integers(41, 401) if u < 0.75 else rng.integers(401, 3001))
    u = rng.random()
    if u < 0.2:
        w = 1
    elif u < 0.3:
        w = L
    else:
        w = int(rng.integers(1, (min(L, 32) if u < 0.8 else L) + 1))
    while B * Hkv * G * w * L > cost and (w > 1 or G > 1 or Hkv > 1 or B > 1):
        if w > 1:
            w = max(1, w // 2)
        elif G > 1:
            G //= 2
        elif Hkv > 1:
            Hkv //= 2
        else:
            B -= 1
    return B, Hkv, G, D, L, w
