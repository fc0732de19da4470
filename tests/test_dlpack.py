"""The DLPack boundary: legacy and versioned capsules from torch and NumPy, and a producer built by
hand with ctypes (structs declared from the DLPack spec) to reach what frameworks never send:
byte offsets, NULL strides, read-only outputs, foreign devices and dtypes, and deleter counting."""
from __future__ import annotations

import collections
import ctypes as C
import itertools

import numpy as np
import pytest

import chunkkv
import reference as ref
from chunkkv import _C
from conftest import need_torch

# ------------------------------------------------------------------ the DLPack ABI (dlpack.h v1.x)

kDLCPU, kDLCUDA, kDLCUDAHost, kDLOpenCL, kDLVulkan = 1, 2, 3, 4, 7
kDLInt, kDLUInt, kDLFloat, kDLBfloat, kDLBool = 0, 1, 2, 4, 6
DLPACK_FLAG_BITMASK_READ_ONLY = 1


class DLDevice(C.Structure):
    _fields_ = [("device_type", C.c_int32), ("device_id", C.c_int32)]


class DLDataType(C.Structure):
    _fields_ = [("code", C.c_uint8), ("bits", C.c_uint8), ("lanes", C.c_uint16)]


class DLTensor(C.Structure):
    _fields_ = [("data", C.c_void_p), ("device", DLDevice), ("ndim", C.c_int32), ("dtype", DLDataType),
                ("shape", C.POINTER(C.c_int64)), ("strides", C.POINTER(C.c_int64)), ("byte_offset", C.c_uint64)]


class DLManagedTensor(C.Structure):
    pass


LEGACY_DELETER = C.CFUNCTYPE(None, C.POINTER(DLManagedTensor))
DLManagedTensor._fields_ = [("dl_tensor", DLTensor), ("manager_ctx", C.c_void_p), ("deleter", LEGACY_DELETER)]


class DLPackVersion(C.Structure):
    _fields_ = [("major", C.c_uint32), ("minor", C.c_uint32)]


class DLManagedTensorVersioned(C.Structure):
    pass


VERSIONED_DELETER = C.CFUNCTYPE(None, C.POINTER(DLManagedTensorVersioned))
DLManagedTensorVersioned._fields_ = [("version", DLPackVersion), ("manager_ctx", C.c_void_p),
                                     ("deleter", VERSIONED_DELETER), ("flags", C.c_uint64),
                                     ("dl_tensor", DLTensor)]

PyCapsule_New = C.pythonapi.PyCapsule_New
PyCapsule_New.restype = C.py_object
PyCapsule_New.argtypes = [C.c_void_p, C.c_char_p, C.c_void_p]
PyCapsule_GetName = C.pythonapi.PyCapsule_GetName
PyCapsule_GetName.restype = C.c_char_p
PyCapsule_GetName.argtypes = [C.py_object]

#: deleter calls per managed tensor, by the unique id each one carries in manager_ctx
DELETED = collections.Counter()
_NEXT_ID = itertools.count(1)


@LEGACY_DELETER
def _legacy_deleter(ptr):
    DELETED[ptr.contents.manager_ctx] += 1


@VERSIONED_DELETER
def _versioned_deleter(ptr):
    DELETED[ptr.contents.manager_ctx] += 1


_NAME_V, _NAME_L = b"dltensor_versioned", b"dltensor"
_DTYPES = {np.dtype(np.float32): (kDLFloat, 32), np.dtype(np.float16): (kDLFloat, 16),
           np.dtype(np.float64): (kDLFloat, 64), np.dtype(np.int64): (kDLInt, 64),
           np.dtype(np.int32): (kDLInt, 32), np.dtype(np.uint8): (kDLUInt, 8), np.dtype(np.bool_): (kDLBool, 8)}


class Producer:
    """Hands out hand-built DLPack capsules over a NumPy array's memory.

    base/offset: the capsule's data pointer is base's first byte and byte_offset is `offset`
    (elements of the array's dtype), so the tensor starts inside base. strides=None sends NULL
    strides (compact row-major). dtype overrides (code, bits, lanes)."""

    def __init__(self, array, *, versioned=True, base=None, offset=0, null_strides=False, dtype=None,
                 device=(kDLCPU, 0), flags=0, version=(1, 0), ndim=None, null_data=False):
        self.array = array
        self.base = array if base is None else base
        self.versioned, self.offset, self.null_strides = versioned, offset, null_strides
        self.dtype = dtype or (*_DTYPES[array.dtype], 1)
        self.device, self.flags, self.version = device, flags, version
        self.ndim = array.ndim if ndim is None else ndim
        self.null_data = null_data
        self.shape = array.shape
        self.capsules, self.managed, self._keep = [], [], []

    def __dlpack__(self, stream=None, max_version=None, **kwargs):
        return self.capsule()

    def __dlpack_device__(self):
        return self.device

    def capsule(self):
        a = self.array
        shape = (C.c_int64 * max(a.ndim, 1))(*a.shape)
        strides = (C.c_int64 * max(a.ndim, 1))(*(s // a.itemsize for s in a.strides))
        t = DLTensor()
        t.data = None if self.null_data else self.base.ctypes.data
        t.device = DLDevice(*self.device)
        t.ndim = self.ndim
        t.dtype = DLDataType(*self.dtype)
        t.shape = shape
        t.strides = None if self.null_strides else strides
        t.byte_offset = self.offset * a.itemsize
        if self.versioned:
            m = DLManagedTensorVersioned()
            m.version = DLPackVersion(*self.version)
            m.deleter, m.flags, m.dl_tensor = _versioned_deleter, self.flags, t
        else:
            m = DLManagedTensor()
            m.deleter, m.dl_tensor = _legacy_deleter, t
        m.manager_ctx = next(_NEXT_ID)
        self._keep += [shape, strides, m]
        cap = PyCapsule_New(C.addressof(m), _NAME_V if self.versioned else _NAME_L, None)
        self.capsules.append(cap)
        self.managed.append(m.manager_ctx)
        return cap

    def deleted(self):
        """Deleter calls for each capsule handed out so far."""
        return [DELETED[a] for a in self.managed]

    def names(self):
        return [PyCapsule_GetName(c) for c in self.capsules]


def inner(big, *index):
    """big[index] and its offset in elements from big's first element (for byte_offset)."""
    view = big[index]
    return view, (view.ctypes.data - big.ctypes.data) // big.itemsize


@pytest.fixture
def qkv():
    rng = np.random.default_rng(0)
    q = rng.standard_normal((2, 4, 3, 16)).astype(np.float32)
    k = rng.standard_normal((2, 2, 40, 16)).astype(np.float32)
    v = rng.standard_normal((2, 2, 40, 16)).astype(np.float32)
    return q, k, v


# ------------------------------------------------------------------ framework capsules


class LegacyTorch:
    """A producer that ignores max_version and returns a legacy capsule from torch."""

    def __init__(self, t):
        self.t, self.shape = t, t.shape

    def __dlpack__(self, *args, **kwargs):
        import torch.utils.dlpack

        return torch.utils.dlpack.to_dlpack(self.t)


class OldSignature:
    """A pre-max_version producer: __dlpack__(stream=None) only; chunkkv retries without max_version."""

    def __init__(self, a):
        self.a, self.shape = a, a.shape
        self.calls = []

    def __dlpack__(self, stream=None):
        self.calls.append(stream)
        return self.a.__dlpack__()


def test_framework_capsules_are_versioned(qkv):
    need_torch()
    import torch

    q, _, _ = qkv
    assert PyCapsule_GetName(q.__dlpack__(max_version=(1, 0))) == b"dltensor_versioned"
    assert PyCapsule_GetName(torch.from_numpy(q).__dlpack__(max_version=(1, 0))) == b"dltensor_versioned"
    assert PyCapsule_GetName(torch.utils.dlpack.to_dlpack(torch.from_numpy(q))) == b"dltensor"


def test_legacy_torch_capsules(qkv):
    need_torch()
    import torch

    q, k, v = qkv
    tq, tk, tv = (torch.from_numpy(x) for x in qkv)
    want_s = chunkkv.score(q, k)
    assert np.array_equal(chunkkv.score(LegacyTorch(tq), LegacyTorch(tk)), want_s)
    want_i = chunkkv.select(q, k, budget=12, chunk_size=3)
    idx = chunkkv.select(LegacyTorch(tq), LegacyTorch(tk), budget=12, chunk_size=3)
    assert np.array_equal(idx, want_i)
    ok, ov = torch.zeros(2, 2, 12, 16), torch.zeros(2, 2, 12, 16)
    chunkkv.gather(LegacyTorch(tk), LegacyTorch(tv), LegacyTorch(torch.from_numpy(idx)),
                   out=(LegacyTorch(ok), LegacyTorch(ov)))
    wk, wv = ref.gather(k, v, idx)
    assert np.array_equal(ok.numpy(), wk) and np.array_equal(ov.numpy(), wv)
    # and gather allocating its own outputs through np.from_dlpack of a legacy producer
    ok2, _ = chunkkv.gather(LegacyTorch(tk), LegacyTorch(tv), idx)
    assert np.array_equal(ok2, wk)


def test_producer_without_max_version(qkv):
    q, k, _ = qkv
    pq, pk = OldSignature(q), OldSignature(k)
    assert np.array_equal(chunkkv.score(pq, pk), chunkkv.score(q, k))
    assert pq.calls == [None] and pk.calls == [None]


def test_numpy_read_only_inputs_are_fine(qkv):
    q, k, _ = qkv
    qr, kr = q.copy(), k.copy()
    qr.flags.writeable = kr.flags.writeable = False  # exported versioned with the read-only flag
    assert np.array_equal(chunkkv.score(qr, kr), chunkkv.score(q, k))


def test_numpy_read_only_output_is_refused(qkv):
    _, k, v = qkv
    idx = np.array([[0, 5], [1, 2]])
    ok, ov = np.zeros((2, 2, 2, 16), np.float32), np.zeros((2, 2, 2, 16), np.float32)
    ok.flags.writeable = False
    with pytest.raises(BufferError, match="keys_out"):
        chunkkv.gather(k, v, idx, out=(ok, ov))
    assert not ok.any() and not ov.any()


# ------------------------------------------------------------------ hand-built capsules


@pytest.mark.parametrize("versioned", [True, False])
def test_byte_offset_and_strides(qkv, versioned):
    """Tensors that start inside a bigger buffer (byte_offset) with their own strides."""
    q, k, v = qkv
    bigq = np.zeros((3, 5, 7, 40), np.float32)
    vq, oq = inner(bigq, slice(1, 3), slice(0, 4), slice(2, 5), slice(3, 35, 2))
    vq[...] = q
    bigk = np.zeros((2, 3, 90, 17), np.float32)
    vk, ok_ = inner(bigk, slice(None), slice(1, 3), slice(5, 85, 2), slice(1, 17))
    vk[...] = k
    pq = Producer(vq, versioned=versioned, base=bigq, offset=oq)
    pk = Producer(vk, versioned=versioned, base=bigk, offset=ok_)
    assert oq > 0 and ok_ > 0
    assert np.array_equal(chunkkv.score(pq, pk), chunkkv.score(q, k))
    assert np.array_equal(chunkkv.select(pq, pk, budget=9, chunk_size=2), chunkkv.select(q, k, budget=9, chunk_size=2))
    # an output inside a bigger buffer: only its own elements change
    idx = np.array([[0, 3, 39], [7, 7, 1]])
    bigo = np.full((4, 3, 6, 20), -5.0, np.float32)
    vo, oo = inner(bigo, slice(1, 3), slice(0, 2), slice(1, 4), slice(2, 18))
    guard = bigo.copy()
    mask = np.zeros(bigo.shape, bool)
    mask[1:3, 0:2, 1:4, 2:18] = True
    outv = np.zeros((2, 2, 3, 16), np.float32)
    chunkkv.gather(k, v, idx, out=(Producer(vo, versioned=versioned, base=bigo, offset=oo), outv))
    assert np.array_equal(bigo[1:3, 0:2, 1:4, 2:18], ref.gather(k, v, idx)[0])
    assert np.array_equal(bigo[~mask], guard[~mask])
    assert np.array_equal(outv, ref.gather(k, v, idx)[1])
    assert pq.deleted() == [1, 1] and pk.deleted() == [1, 1]


@pytest.mark.parametrize("versioned", [True, False])
def test_null_strides(qkv, versioned):
    q, k, v = qkv
    pq, pk = Producer(q, versioned=versioned, null_strides=True), Producer(k, versioned=versioned, null_strides=True)
    assert np.array_equal(chunkkv.score(pq, pk), chunkkv.score(q, k))
    # NULL strides with a byte offset: the compact tensor starts 10 floats into the buffer
    buf = np.zeros(10 + k.size, np.float32)
    buf[10:] = k.ravel()
    view = buf[10:].reshape(k.shape)
    pk2 = Producer(view, versioned=versioned, base=buf, offset=10, null_strides=True)
    assert np.array_equal(chunkkv.score(q, pk2), chunkkv.score(q, k))
    out = np.zeros((2, 2, 2, 16), np.float32)
    chunkkv.gather(k, v, np.array([[1, 2], [3, 4]]), out=(Producer(out, null_strides=True, versioned=versioned),
                                                          np.zeros_like(out)))
    assert np.array_equal(out, ref.gather(k, v, np.array([[1, 2], [3, 4]]))[0])


def test_read_only_flag_on_output_is_refused(qkv):
    _, k, v = qkv
    idx = np.array([[0, 1], [2, 3]])
    out = np.zeros((2, 2, 2, 16), np.float32)
    p_ro = Producer(out, flags=DLPACK_FLAG_BITMASK_READ_ONLY)
    with pytest.raises(BufferError, match="keys_out.*read-only"):
        chunkkv.gather(k, v, idx, out=(p_ro, np.zeros_like(out)))
    assert not out.any()
    assert p_ro.deleted() == [1] and p_ro.names() == [b"used_dltensor_versioned"]
    # the same flag on an input is fine
    p_in = Producer(k.copy(), flags=DLPACK_FLAG_BITMASK_READ_ONLY)
    ok, _ = chunkkv.gather(p_in, v, idx, out=(np.zeros_like(out), np.zeros_like(out)))
    assert np.array_equal(ok, ref.gather(k, v, idx)[0]) and p_in.deleted() == [1]
    # and straight through the binding: score's output
    q = np.zeros((2, 4, 3, 16), np.float32)
    scores = np.zeros((2, 2, 37), np.float32)
    p_s = Producer(scores, flags=DLPACK_FLAG_BITMASK_READ_ONLY)
    with pytest.raises(BufferError, match="scores"):
        _C.score(q.__dlpack__(), k.__dlpack__(), p_s.capsule())
    assert p_s.deleted() == [1] and not scores.any()


@pytest.mark.parametrize("device", [kDLOpenCL, kDLVulkan, 12, 99])
@pytest.mark.parametrize("versioned", [True, False])
def test_unsupported_device(qkv, device, versioned):
    q, k, _ = qkv
    p = Producer(k, device=(device, 0), versioned=versioned)
    with pytest.raises(TypeError, match=r"keys.*device"):
        chunkkv.score(q, p)
    assert p.deleted() == [1]


def _gpu_present() -> bool:
    try:
        import torch
        return torch.cuda.is_available()
    except ImportError:
        return False


def test_cuda_tensors_are_refused_or_reported_without_a_gpu(qkv):
    """A CUDA tensor reaches CUDA code only on a CUDA build; without a GPU that is a clean error.
    (On a machine with a GPU the fake pointer must not reach a kernel: only the mixed case runs.)"""
    q, k, _ = qkv
    with pytest.raises(TypeError, match="keys.*queries|one device"):  # mixed devices: refused before any backend
        chunkkv.score(q, Producer(k, device=(kDLCUDA, 0)))
    if _gpu_present():
        return
    p = Producer(k, device=(kDLCUDA, 0))
    scores = Producer(np.zeros((k.shape[0], k.shape[1], k.shape[2] - q.shape[2]), np.float32), device=(kDLCUDA, 0))
    expected = RuntimeError if chunkkv.build_info()["cuda"] else TypeError
    pq = Producer(q, device=(kDLCUDA, 0))  # producers own the structs their capsules point to: keep them alive
    with pytest.raises(expected, match="(?i)cuda"):
        _C.score(pq.capsule(), p.capsule(), scores.capsule())
    assert p.deleted() == [1] and scores.deleted() == [1] and pq.deleted() == [1]


def test_cuda_host_memory_is_read_as_cpu(qkv):
    q, k, _ = qkv
    assert np.array_equal(chunkkv.score(q, Producer(k, device=(kDLCUDAHost, 0))), chunkkv.score(q, k))


@pytest.mark.parametrize("dtype", [(kDLFloat, 64, 1), (kDLInt, 32, 1), (kDLUInt, 8, 1), (kDLBool, 8, 1),
                                   (kDLFloat, 32, 4), (kDLFloat, 16, 2), (kDLBfloat, 32, 1), (kDLInt, 16, 1)])
def test_unsupported_dtype(qkv, dtype):
    q, k, _ = qkv
    p = Producer(k, dtype=dtype)
    with pytest.raises(TypeError, match="keys"):
        chunkkv.score(q, p)
    assert p.deleted() == [1]


@pytest.mark.parametrize("ndim", [0, 5])
def test_bad_ndim(ndim):
    a = np.zeros((1, 1, 1, 1, 1), np.float32)
    p = Producer(a, ndim=ndim)
    with pytest.raises(ValueError, match="queries.*dimensions"):
        _C.score(p.capsule(), np.zeros((1, 1, 2, 1), np.float32).__dlpack__(),
                 np.zeros((1, 1, 1), np.float32).__dlpack__())
    assert p.deleted() == [1]


def test_versions(qkv):
    q, k, _ = qkv
    p = Producer(k, version=(1, 7))  # a newer minor version reads the same
    assert np.array_equal(chunkkv.score(q, p), chunkkv.score(q, k))
    p = Producer(k, version=(2, 0))
    with pytest.raises(BufferError, match="version"):
        chunkkv.score(q, p)
    assert p.deleted() == [1]


def test_null_data_pointer(qkv):
    q, k, _ = qkv
    p = Producer(k, null_data=True)
    with pytest.raises(BufferError, match="keys"):
        chunkkv.score(q, p)
    assert p.deleted() == [1]


@pytest.mark.parametrize("versioned", [True, False])
def test_deleter_called_once_per_consumed_capsule(qkv, versioned):
    q, k, v = qkv
    pq, pk = Producer(q, versioned=versioned), Producer(k, versioned=versioned)
    scores = np.zeros((2, 2, 37), np.float32)
    ps = Producer(scores, versioned=versioned)
    # success
    _C.score(pq.capsule(), pk.capsule(), ps.capsule())
    assert np.array_equal(scores, chunkkv.score(q, k))
    # a core error after all three were borrowed (scores of the wrong batch size)
    bad = Producer(np.zeros((3, 2, 37), np.float32), versioned=versioned)
    with pytest.raises(ValueError, match="scores"):
        _C.score(pq.capsule(), pk.capsule(), bad.capsule())
    # a borrow error on the second capsule: the first is consumed, the third never touched
    wrong = Producer(k.astype(np.float64), versioned=versioned)
    third = ps.capsule()
    with pytest.raises(TypeError, match="keys"):
        _C.score(pq.capsule(), wrong.capsule(), third)
    used = b"used_dltensor_versioned" if versioned else b"used_dltensor"
    fresh = b"dltensor_versioned" if versioned else b"dltensor"
    assert pq.deleted() == [1, 1, 1] and pk.deleted() == [1, 1] and wrong.deleted() == [1]
    assert bad.deleted() == [1]
    assert ps.deleted() == [1, 0] and ps.names() == [used, fresh]
    # the untouched capsule still works, once
    _C.score(pq.capsule(), pk.capsule(), third)
    assert ps.deleted() == [1, 1] and ps.names() == [used, used]
    # a consumed capsule is refused and not deleted again
    with pytest.raises(BufferError, match="consumed"):
        _C.score(pq.capsules[0], pk.capsule(), ps.capsule())
    assert pq.deleted()[0] == 1
    # every capsule that chunkkv consumed was deleted exactly once
    for p in (pq, pk, ps, bad, wrong):
        assert all(n == 1 for n, name in zip(p.deleted(), p.names()) if name == used)


def test_not_a_capsule():
    k = np.zeros((1, 1, 4, 2), np.float32)
    with pytest.raises(TypeError, match="queries.*capsule"):
        _C.score(object(), k.__dlpack__(), np.zeros((1, 1, 3), np.float32).__dlpack__())


def test_torch_capsules_are_released():
    """torch tensors passed through chunkkv are not kept alive (the deleter ran)."""
    need_torch()
    import sys

    import torch

    k = torch.zeros(1, 2, 10, 4)
    q = torch.zeros(1, 2, 1, 4)
    base = sys.getrefcount(k)
    for _ in range(5):
        chunkkv.score(q, k)
        chunkkv.select(q, k, budget=3)
    assert sys.getrefcount(k) == base
