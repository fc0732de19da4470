"""The core ops on NumPy arrays and torch tensors, through DLPack.

Each function checks the Python-level types, allocates its outputs in the
caller's framework and on the caller's device, hands every tensor to the C
core as a DLPack capsule (no copy), and returns the outputs. Values and
shapes are checked once, in C; a bad one raises ValueError or TypeError
naming the argument.

Dimension letters: B batch, Hq/Hkv query/KV heads, w window, L tokens,
D head dim, n kept tokens = min(budget, L).
"""
from __future__ import annotations

import math
from typing import Any, Optional, Tuple

import numpy as np

from . import _C

Tensor = Any  # a numpy.ndarray, a torch.Tensor, or anything with __dlpack__

#: chunkkv.select's method name -> the C core's ckv_method value (appended, never renumbered). What each method
#: does is described once, in the registry (chunkkv.compressors, chunkkv.methods()); pyramidkv selects as snapkv
#: (its per-layer budgets are chunkkv.patch's business).
_CORE_METHODS = {"chunkkv": 0, "snapkv": 1, "streamingllm": 2, "random": 3, "h2o": 4, "chunkkv-kvpress": 5,
                 "pyramidkv": 1}

_INT64_MAX = 2**63 - 1


def _is_torch(x: Any) -> bool:
    return type(x).__module__.split(".")[0] == "torch"


def _check_tensor(x: Any, name: str) -> None:
    if not hasattr(x, "__dlpack__"):
        raise TypeError(
            f"{name}: expected a torch.Tensor, a numpy.ndarray or an object with __dlpack__, got {type(x).__name__}")


# DLPack device types whose memory the CUDA kernels touch; a stream is exchanged only for these.
# (kDLCUDAHost, pinned host memory, is read by the CPU: no stream.)
_DL_CUDA_DEVICES = (2, 13)  # kDLCUDA, kDLCUDAManaged


def _stream_of(x: Any) -> Optional[int]:
    """The CUDA stream (a cudaStream_t as an int) chunkkv's kernels run on for a CUDA tensor x, None for host
    memory: the caller's current stream. That is torch's current stream on x's device once torch has set up
    CUDA (so ``with torch.cuda.stream(s)`` holds for tensors of any framework), else the legacy default
    stream, 0. The ops hand this same stream to every producer's ``__dlpack__`` (see _dlpack_stream)."""
    try:
        dev_type, dev_id = x.__dlpack_device__()
    except (AttributeError, TypeError, ValueError):  # a producer that predates __dlpack_device__: host memory
        return None
    if int(dev_type) not in _DL_CUDA_DEVICES:
        return None
    import sys

    torch = sys.modules.get("torch")  # never import torch (or set up its CUDA) for another framework's tensor
    if torch is not None and torch.cuda.is_initialized():
        return int(torch.cuda.current_stream(int(dev_id)).cuda_stream)
    return 0


def _dlpack_stream(stream: Optional[int]) -> Optional[int]:
    """The DLPack ``stream`` argument for the consumer stream `stream` (DLPack Python spec, CUDA: None means
    no synchronisation, 1 the legacy default stream, 2 the per-thread default stream, 0 is not allowed)."""
    if stream is None:
        return None
    return 1 if stream == 0 else stream


def _export(x: Any, name: str) -> Any:
    """A DLPack capsule of x: versioned (1.x) when the producer offers it, else legacy. For CUDA memory the
    producer is given the stream the kernels will run on (_stream_of), so it orders its pending work on x
    before them."""
    _check_tensor(x, name)
    if _is_torch(x):
        x = x.detach()
    stream = _dlpack_stream(_stream_of(x))
    try:
        return x.__dlpack__(stream=stream, max_version=(1, 0))
    except TypeError:  # a producer that predates max_version
        return x.__dlpack__(stream=stream) if stream is not None else x.__dlpack__()


def _empty_like_kind(ref: Any, shape: Tuple[int, ...], dtype: str) -> Any:
    """An uninitialised output in ref's framework and on ref's device ("float32", "int64" or "same")."""
    if _is_torch(ref):
        import torch

        dt = {"float32": torch.float32, "int64": torch.int64, "same": ref.dtype}[dtype]
        try:
            return torch.empty(shape, dtype=dt, device=ref.device)
        except RuntimeError as e:  # torch reports an allocation it cannot make as a RuntimeError
            if "alloc" in str(e) or "overflow" in str(e):
                raise MemoryError(f"could not allocate an output of shape {list(shape)}: {e}") from e
            raise
    if dtype == "same":
        dt = np.from_dlpack(ref).dtype if not isinstance(ref, np.ndarray) else ref.dtype
    else:
        dt = np.dtype(dtype)
    return np.empty(shape, dtype=dt)


def _int_arg(value: Any, name: str, minimum: Optional[int] = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    value = int(value)
    if not -_INT64_MAX <= value <= _INT64_MAX:
        raise ValueError(f"{name}: {value} does not fit in 64 bits")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value}")
    return value


def _seed_arg(seed: Any) -> int:
    """Any int in [0, 2**64): the core's generator takes all 64 bits."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed: expected an int, got {type(seed).__name__}")
    if not 0 <= int(seed) < 2**64:
        raise ValueError(f"seed: expected an int in [0, 2**64), got {seed}")
    return int(seed)


def _scale_arg(scale: Optional[float], name: str = "scale") -> float:
    if scale is None:
        return 0.0  # the core uses 1/sqrt(D)
    if isinstance(scale, bool) or not isinstance(scale, (int, float, np.floating)):
        raise TypeError(f"{name}: expected a float or None, got {type(scale).__name__}")
    if not math.isfinite(float(scale)) or float(scale) == 0.0:
        raise ValueError(f"{name}: expected a finite non-zero float, got {scale}")
    with np.errstate(over="ignore", under="ignore"):
        as_f32 = np.float32(float(scale))
    # the core takes a float32 (0 there means 1/sqrt(D)): a scale that rounds to 0 or Inf would be wrong silently
    if not np.isfinite(as_f32) or as_f32 == 0.0:
        raise ValueError(f"{name}: {scale} is outside the float32 range the core computes in")
    return float(scale)


def _shape(x: Any, name: str, ndim: int) -> Tuple[int, ...]:
    _check_tensor(x, name)  # a TypeError naming the argument, before x.shape can raise AttributeError
    try:
        shape = tuple(int(s) for s in x.shape)
    except (AttributeError, TypeError, ValueError) as e:
        raise TypeError(f"{name}: expected a tensor with a shape, got {type(x).__name__}") from e
    if len(shape) != ndim:
        raise ValueError(f"{name}: expected {ndim} dimensions, got shape {list(shape)}")
    return shape


def methods() -> dict[str, str]:
    """Every compression method (chunkkv.select and chunkkv.patch take each name), with one line each."""
    from .compressors import methods as _registry

    return _registry()


def set_num_threads(n: int) -> None:
    """CPU threads the kernels use; n <= 0 restores the default (CHUNKKV_NUM_THREADS, then OMP_NUM_THREADS, then all cores)."""
    _C.set_num_threads(_int_arg(n, "n"))


def get_num_threads() -> int:
    """CPU threads the kernels use now."""
    return int(_C.get_num_threads())


def fma_peak_gflops(threads: int = 0, seconds: float = 0.2) -> float:
    """The CPU's fp32 peak in GFLOP/s on ``threads`` threads (0: the kernels' count), measured by a loop of
    independent FMAs held in registers at the widest vector level: the ceiling for scoring speed."""
    return float(_C.fma_peak_gflops(_int_arg(threads, "threads"), float(seconds)))


def build_info() -> dict[str, Any]:
    """What this build of the C core has: version, "cuda", "openmp", "simd" (the CPU kernels' vector level:
    "avx512-bf16", "avx512", "avx2" or "baseline"; ``CHUNKKV_SIMD`` lowers it), and the thread count."""
    info = dict(_C.build_info())
    info["threads"] = get_num_threads()
    return info


def _row_starts_arg(row_starts: Any) -> Optional[Tuple[int, ...]]:
    if row_starts is None:
        return None
    if _is_torch(row_starts) or isinstance(row_starts, np.ndarray):
        row_starts = row_starts.tolist()
    if not isinstance(row_starts, (list, tuple)):
        raise TypeError(f"row_starts: expected None or a sequence of ints, got {type(row_starts).__name__}")
    return tuple(_int_arg(s, "row_starts") for s in row_starts)


def score(queries: Tensor, keys: Tensor, *, scale: Optional[float] = None, row_starts: Any = None,
          prefix: Optional[int] = None) -> Tensor:
    """Token scores: summed causal attention of the queries, float32 [B, Hkv, prefix].

    queries [B, Hq, w, D] (RoPE applied; they sit at the last w positions), keys [B, Hkv, L, D];
    scale defaults to 1/sqrt(D); prefix (default L - w) is how many leading keys are scored
    (with all L prompt queries and prefix L - window these are H2O's column sums).
    row_starts (one int per batch row) masks out left padding: keys before it get no attention.
    """
    qs, ks = _shape(queries, "queries", 4), _shape(keys, "keys", 4)
    P = max(ks[2] - qs[2], 0) if prefix is None else _int_arg(prefix, "prefix", 0)
    out = _empty_like_kind(keys, (ks[0], ks[1], P), "float32")
    _C.score(_export(queries, "queries"), _export(keys, "keys"), _export(out, "scores"), _scale_arg(scale),
             _row_starts_arg(row_starts), stream=_stream_of(keys) or 0)
    return out


def select(queries: Tensor, keys: Tensor, *, budget: int, chunk_size: int = 10, scale: Optional[float] = None,
           per_head: bool = False, method: str = "chunkkv", pool_kernel: int = 1, pool: str = "avg",
           n_sink: int = 4, seed: int = 0, row_starts: Any = None, window: Optional[int] = None,
           keep_fraction: Optional[float] = None) -> Tensor:
    """Positions to keep, int64 [B, n] (or [B, Hkv, n] with per_head), sorted, n = min(budget, L).

    queries [B, Hq, w, D]: the last w prompt queries (RoPE applied); keys [B, Hkv, L, D].
    budget counts kept tokens per row, window included (budget >= w). chunk_size applies to
    "chunkkv"; pool_kernel and pool ("avg" or "max") to "snapkv"; n_sink to "streamingllm";
    seed to "random". "h2o" takes every prompt query (queries [B, Hq, L, D]) and keeps `window`
    recent tokens. "chunkkv-kvpress" (pool_kernel 5 there, as kvpress) keeps
    max(1, int(chunks * keep_fraction)) whole chunks of chunk_size over all L tokens, which can be
    fewer than budget (the short last chunk; the int() rounding down); keep_fraction defaults to
    budget / L. row_starts (one int per batch row, for left padding): row b's tokens are
    [row_starts[b], L); padding is masked out of scoring and never kept, except that a row with
    fewer than n tokens keeps the last n positions (its padding slots must stay masked).
    """
    if method not in _CORE_METHODS:
        raise ValueError(f"method: expected one of {sorted(_CORE_METHODS)}, got {method!r}")
    if pool not in ("avg", "max"):
        raise ValueError(f"pool: expected 'avg' or 'max', got {pool!r}")
    if not isinstance(per_head, (bool, np.bool_)):
        raise TypeError(f"per_head: expected a bool, got {type(per_head).__name__}")
    qs, ks = _shape(queries, "queries", 4), _shape(keys, "keys", 4)
    budget = _int_arg(budget, "budget")
    chunk_size = _int_arg(chunk_size, "chunk_size")
    L = ks[2]
    if keep_fraction is None:
        keep_fraction = budget / L if L > 0 else 1.0
    elif isinstance(keep_fraction, bool) or not isinstance(keep_fraction, (int, float)):
        raise TypeError(f"keep_fraction: expected a float, got {type(keep_fraction).__name__}")
    window = qs[2] if window is None else _int_arg(window, "window")
    code = _CORE_METHODS[method]
    n = max(0, int(_C.select_count(code, budget, max(chunk_size, 1), float(keep_fraction), L)))
    shape = (ks[0], ks[1], n) if per_head else (ks[0], n)
    out = _empty_like_kind(keys, shape, "int64")
    _C.select(_export(queries, "queries"), _export(keys, "keys"), _export(out, "indices"),
              method=code, budget=budget, chunk_size=chunk_size,
              scale=_scale_arg(scale), per_head=bool(per_head), pool_kernel=_int_arg(pool_kernel, "pool_kernel"),
              pool_max=pool == "max", n_sink=_int_arg(n_sink, "n_sink"), seed=_seed_arg(seed),
              stream=_stream_of(keys) or 0, row_starts=_row_starts_arg(row_starts), window=window,
              keep_fraction=float(keep_fraction))
    if method == "chunkkv-kvpress" and not (0 < chunk_size <= L and (n == L or L % chunk_size == 0)):
        out = _trim_padding(out)  # a host sync on CUDA: skipped where no row can keep a short last chunk
    return out


#: methods whose selection is a function of the (head-summed) token scores alone
_SCORE_METHODS = ("chunkkv", "snapkv", "pyramidkv", "h2o")


def _contiguous(x: Any) -> Any:
    """x, or a C-contiguous copy of it (the core reads given scores as rows of P floats)."""
    if _is_torch(x):
        return x.contiguous()
    if isinstance(x, np.ndarray):
        return np.ascontiguousarray(x)
    return x


def select_from_scores(scores: Tensor, *, length: int, budget: int, chunk_size: int = 10, method: str = "chunkkv",
                       row_starts: Any = None, pool_kernel: int = 1, pool: str = "avg") -> Tensor:
    """select()'s positions from token scores given by the caller, int64 [B, n] (or [B, Hkv, n]), n = min(budget, length).

    scores: float32 [B, P] (one selection per row) or [B, Hkv, P] (one per KV head, as select's
    per_head); e.g. score()'s output summed over heads in head order, and over tensor-parallel ranks
    after an all-reduce, so that every rank keeps the same positions. length is L, the cache's
    tokens: the window [P, length) is always kept and budget >= length - P. Methods: "chunkkv"
    (chunk_size), "snapkv" / "pyramidkv" (pool_kernel, pool "avg" or "max") and "h2o" (the best raw
    scores); the others do not select from summed scores and raise ValueError. row_starts as in
    select(). Given score()'s head sums this returns exactly what select() returns.
    """
    if method not in _SCORE_METHODS:
        raise ValueError(f"method: select_from_scores takes one of {list(_SCORE_METHODS)}, got {method!r} "
                         "(streamingllm and random read no scores, chunkkv-kvpress ranks its own; use select())")
    if pool not in ("avg", "max"):
        raise ValueError(f"pool: expected 'avg' or 'max', got {pool!r}")
    _check_tensor(scores, "scores")
    shape = tuple(int(s) for s in scores.shape)
    if len(shape) not in (2, 3):
        raise ValueError(f"scores: expected 2 dimensions [B, P] or 3 [B, Hkv, P], got shape {list(shape)}")
    length, budget = _int_arg(length, "length", 0), _int_arg(budget, "budget")
    n = max(0, min(budget, length))
    out = _empty_like_kind(scores, shape[:-1] + (n,), "int64")
    scores = _contiguous(scores)
    _C.select_from_scores(_export(scores, "scores"), _export(out, "indices"), length,
                          method=_CORE_METHODS[method], budget=budget, chunk_size=_int_arg(chunk_size, "chunk_size"),
                          per_head=len(shape) == 3, pool_kernel=_int_arg(pool_kernel, "pool_kernel"),
                          pool_max=pool == "max", stream=_stream_of(scores) or 0,
                          row_starts=_row_starts_arg(row_starts))
    return out


def _trim_padding(indices: Any) -> Any:
    """Drop the -1 columns chunkkv-kvpress pads with when the short last chunk was kept.

    Rows pad only when L is not a multiple of chunk_size and fewer than all L tokens are kept; select skips
    this call when chunk_size <= L and neither holds. Otherwise the output's width depends on the selection,
    so on CUDA this waits for it.
    """
    kept = (indices >= 0).sum(-1)
    counts = {int(c) for c in (kept.tolist() if hasattr(kept, "tolist") else kept)}
    if len(counts) > 1:
        raise ValueError("chunkkv-kvpress: the rows kept different numbers of tokens (kvpress keeps whole chunks and "
                         "the last one is shorter); use batch size 1, or method='chunkkv' which keeps exact budgets")
    n = counts.pop() if counts else 0
    return indices[..., :n]


def _index_count(indices: Any) -> int:
    """n of indices [B, n] or [B, Hkv, n] (ranks the core rejects count 0: it names the problem)."""
    _check_tensor(indices, "indices")
    try:
        shape = tuple(int(s) for s in indices.shape)
    except (AttributeError, TypeError, ValueError) as e:
        raise TypeError(f"indices: expected a tensor with a shape, got {type(indices).__name__}") from e
    return shape[-1] if len(shape) in (2, 3) else 0


def gather(keys: Tensor, values: Tensor, indices: Tensor, *,
           out: Optional[Tuple[Tensor, Tensor]] = None) -> Tuple[Tensor, Tensor]:
    """Kept rows: (keys[b, g, idx], values[b, g, idx]), each [B, Hkv, n, D].

    indices [B, n] (shared by all KV heads) or [B, Hkv, n], int64 in [0, L). With out=(k_out, v_out)
    the rows are written into those buffers (any strides, exact shape) and they are returned.
    """
    ks = _shape(keys, "keys", 4)
    _shape(values, "values", 4)
    n = _index_count(indices)
    if out is None:
        out = (_empty_like_kind(keys, (ks[0], ks[1], n, ks[3]), "same"),
               _empty_like_kind(values, (ks[0], ks[1], n, ks[3]), "same"))
    elif not isinstance(out, (tuple, list)) or len(out) != 2:
        raise TypeError("out: expected a pair (keys_out, values_out)")
    _C.gather(_export(keys, "keys"), _export(values, "values"), _export(indices, "indices"),
              _export(out[0], "keys_out"), _export(out[1], "values_out"), stream=_stream_of(keys) or 0)
    return out[0], out[1]


def compact_(keys: Tensor, values: Tensor, indices: Tensor) -> Tuple[Tensor, Tensor]:
    """Move the kept rows to the front of keys and values in place (no allocation).

    Each row of indices must be strictly increasing (as select returns them). Returns the views
    keys[:, :, :n] and values[:, :, :n].
    """
    _shape(keys, "keys", 4)
    _shape(values, "values", 4)
    n = _index_count(indices)
    k_view, v_view = keys[:, :, :n], values[:, :, :n]
    return gather(keys, values, indices, out=(k_view, v_view))


def compress(queries: Tensor, keys: Tensor, values: Tensor, *, budget: int,
             **select_args: Any) -> Tuple[Tensor, Tensor, Tensor]:
    """select() then gather(): (keys_kept, values_kept, indices). Keyword arguments as in select()."""
    idx = select(queries, keys, budget=budget, **select_args)
    k, v = gather(keys, values, idx)
    return k, v, idx
