"""The DLPack stream exchange for CUDA tensors, and the host syncs chunkkv's Python layer avoids, on the CPU.

A CUDA consumer passes the stream it will use to the producer's ``__dlpack__`` (DLPack Python spec: None no
synchronisation, 1 the legacy default stream, 2 the per-thread default, 0 not allowed for CUDA), so the
producer orders its pending work on the tensor before chunkkv's kernels; the kernels then run on that same
stream. Fake CUDA producers (tests/test_dlpack.py's ctypes Producer, reporting kDLCUDA) record the stream
they are given; ``_C``'s ops are wrapped to record the stream the kernels get. Without a GPU the call then
fails in the core with a clean chunkkv error naming CUDA; on a GPU machine the fake (host) pointers must not
reach a kernel, so the wrapper stops there (tests_gpu/test_cuda.py checks real streams).
"""
from __future__ import annotations

import types

import numpy as np
import pytest

import chunkkv
from chunkkv import ops
from test_dlpack import Producer, kDLCPU, kDLCUDA, kDLCUDAHost

kDLCUDAManaged = 13


def _gpu_present() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


class Recorder(Producer):
    """A DLPack producer that records the stream each __dlpack__ call was given."""

    def __init__(self, array, device=(kDLCUDA, 0), **kwargs):
        super().__init__(array, device=device, **kwargs)
        self.streams = []

    def __dlpack__(self, stream=None, max_version=None, **kwargs):
        self.streams.append(stream)
        return self.capsule()


class OldRecorder(Recorder):
    """A CUDA producer from before DLPack 1.0: __dlpack__(stream=None) only."""

    def __dlpack__(self, stream=None):
        self.streams.append(stream)
        return self.capsule()


class NoDevice:
    """A producer without __dlpack_device__ (before the spec added it): host memory, no stream."""

    def __init__(self, a):
        self.a, self.shape, self.streams = a, a.shape, []

    def __dlpack__(self, stream=None):
        self.streams.append(stream)
        return self.a.__dlpack__()


class KernelStreams(list):
    """(op, stream=) of each _C call; stop_on_gpu: on a machine with a GPU, stop before the core."""

    stop_on_gpu = True


@pytest.fixture
def kernel_streams(monkeypatch):
    """Wrap _C.score, _C.select and _C.gather: record the stream= each is given, then run the core unless a
    GPU is present (the fakes' host pointers must not reach a CUDA kernel)."""
    seen = KernelStreams()
    gpu = _gpu_present()
    for name in ("score", "select", "gather"):
        real = getattr(ops._C, name)

        def wrapper(*args, _real=real, _name=name, **kwargs):
            seen.append((_name, kwargs.get("stream")))
            if gpu and seen.stop_on_gpu:
                raise RuntimeError("test stop: chunkkv (fake CUDA pointers are not given to a GPU)")
            return _real(*args, **kwargs)

        monkeypatch.setattr(ops._C, name, wrapper)
    return seen


def _gather_producers(cls=Recorder, device=(kDLCUDA, 0)):
    rng = np.random.default_rng(1)
    k = rng.standard_normal((2, 2, 30, 8)).astype(np.float32)
    v = rng.standard_normal((2, 2, 30, 8)).astype(np.float32)
    idx = np.sort(rng.choice(30, size=(2, 5), replace=False), axis=-1).astype(np.int64)
    outs = [np.zeros((2, 2, 5, 8), np.float32) for _ in range(2)]
    return [cls(a, device=device) for a in (k, v, idx, *outs)]


def _clean_cuda_error():
    """What a call on fake CUDA memory raises without a GPU: a chunkkv error that names CUDA."""
    return pytest.raises((TypeError, RuntimeError), match="(?i)cuda")


@pytest.mark.parametrize("cls", [Recorder, OldRecorder])
@pytest.mark.parametrize("dev_type", [kDLCUDA, kDLCUDAManaged])
def test_cuda_producers_get_the_legacy_default_stream_as_1(kernel_streams, cls, dev_type):
    """No torch CUDA state: the kernels run on the legacy default stream (cudaStream_t 0), which DLPack
    calls 1; 0 is never sent to a producer, with or without max_version."""
    k, v, idx, ok, ov = ps = _gather_producers(cls, (dev_type, 0))
    with _clean_cuda_error():
        chunkkv.gather(k, v, idx, out=(ok, ov))
    assert [p.streams for p in ps] == [[1]] * 5
    assert kernel_streams == [("gather", 0)]
    if not _gpu_present():  # the core consumed the capsules (with a GPU the test stopped before it)
        assert all(p.deleted() == [1] for p in ps), "every capsule's deleter runs once"


def test_host_producers_get_no_stream(kernel_streams):
    """CPU and pinned host memory (kDLCUDAHost, read by the CPU) take no stream: stream=None."""
    kernel_streams.stop_on_gpu = False  # host memory: the core runs on the CPU
    for device in ((kDLCPU, 0), (kDLCUDAHost, 0)):
        k, v, idx, ok, ov = ps = _gather_producers(Recorder, device)
        rk, rv = chunkkv.gather(k, v, idx, out=(ok, ov))
        assert [p.streams for p in ps] == [[None]] * 5
        assert np.array_equal(ok.array, k.array[np.arange(2)[:, None], :, idx.array].transpose(0, 2, 1, 3))
    assert kernel_streams == [("gather", 0), ("gather", 0)]  # the CPU backend ignores it
    a = np.zeros((2, 2, 4, 8), np.float32)
    old = NoDevice(a)
    chunkkv.gather(old, old, np.zeros((2, 1), np.int64))
    assert old.streams and set(old.streams) == {None}  # asked with max_version, then without


class FakeTorchStreams:
    """torch.cuda's current stream as chunkkv reads it, faked: a CPU build of torch has no CUDA streams."""

    def __init__(self, handle):
        self.handle, self.devices = handle, []

    def install(self, monkeypatch):
        torch = pytest.importorskip("torch")
        monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
        monkeypatch.setattr(torch.cuda, "current_stream", self.current_stream)

    def current_stream(self, device=None):
        self.devices.append(device)
        return types.SimpleNamespace(cuda_stream=self.handle)


@pytest.mark.parametrize("handle, dlpack", [(0x7F00AB10, 0x7F00AB10), (0, 1), (2, 2)])
def test_torch_current_stream_is_the_consumer_stream(kernel_streams, monkeypatch, handle, dlpack):
    """With torch's CUDA set up, its current stream on the tensor's device is the stream for producers of any
    framework and for the kernels; the legacy default (handle 0) goes to producers as 1."""
    if _gpu_present():
        pytest.skip("the fake torch stream is for machines without a GPU")
    fake = FakeTorchStreams(handle)
    fake.install(monkeypatch)
    ps = _gather_producers(Recorder, (kDLCUDA, 3))
    with _clean_cuda_error():
        chunkkv.gather(*ps[:3], out=tuple(ps[3:]))
    assert [p.streams for p in ps] == [[dlpack]] * 5
    assert kernel_streams == [("gather", handle)], "the kernels run on the stream the producers synchronised to"
    assert fake.devices and set(fake.devices) == {3}, "the current stream of the tensor's own device"


def test_score_and_select_pass_the_same_stream(kernel_streams, monkeypatch):
    """score and select: producers and kernels on one stream. (Their outputs are allocated by NumPy for a
    producer that is not torch, so the core refuses the mix of devices, or a CPU build refuses CUDA tensors:
    either way a clean error.)"""
    if _gpu_present():
        pytest.skip("the fake torch stream is for machines without a GPU")
    FakeTorchStreams(0x5EED0).install(monkeypatch)
    rng = np.random.default_rng(2)
    q = Recorder(rng.standard_normal((1, 4, 3, 8)).astype(np.float32))
    k = Recorder(rng.standard_normal((1, 2, 40, 8)).astype(np.float32))
    with pytest.raises(TypeError, match="(?i)device|cuda"):
        chunkkv.score(q, k)
    with pytest.raises(TypeError, match="(?i)device|cuda"):
        chunkkv.select(q, k, budget=10)
    assert q.streams == [0x5EED0, 0x5EED0] and k.streams == [0x5EED0, 0x5EED0]
    assert kernel_streams == [("score", 0x5EED0), ("select", 0x5EED0)]


def test_torch_cuda_is_never_set_up_for_another_framework(monkeypatch):
    """A CUDA tensor of another framework must not make chunkkv import torch or start its CUDA context."""
    torch = pytest.importorskip("torch")

    def refuse(*a, **k):
        raise AssertionError("chunkkv asked torch for a stream although torch's CUDA is not set up")

    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "current_stream", refuse)
    assert ops._stream_of(Recorder(np.zeros((1, 1, 1, 1), np.float32))) == 0
    assert ops._stream_of(np.zeros(3, np.float32)) is None
    assert ops._dlpack_stream(None) is None and ops._dlpack_stream(0) == 1 and ops._dlpack_stream(77) == 77


# ------------------------------------------------------------------ chunkkv-kvpress: the trim and its sync


def _kvpress_cases():
    """(L, chunk_size, keep_fraction, trimmed): padding impossible (L a multiple of the chunk, or every chunk
    kept), possible (a short last chunk that some rows keep and others do not), and chunk_size > L, which
    select always trims (one chunk; the core's arithmetic is not relied on there)."""
    return [(60, 10, 0.3, False), (60, 7, 1.0, False), (60, 60, 0.5, False), (64, 1, 0.2, False),
            (61, 10, 0.3, True), (45, 7, 0.4, True), (103, 20, 0.25, True),
            (50, 60, 0.5, True), (8, 2**63 - 1, 0.5, True)]  # chunk_size > L: trimmed, as before


@pytest.mark.parametrize("L, chunk, frac, trimmed", _kvpress_cases())
def test_kvpress_trims_only_when_a_row_can_pad(monkeypatch, L, chunk, frac, trimmed):
    """The trim (a host sync for CUDA indices) runs only where a row can keep the short last chunk; where it
    is skipped, the core's output holds no padding, so the result is the same as with the trim."""
    calls = []
    real = ops._trim_padding

    def spy(indices):
        calls.append(indices.shape)
        return real(indices)

    monkeypatch.setattr(ops, "_trim_padding", spy)
    rng = np.random.default_rng([L, chunk])
    for trial in range(20):
        q = rng.standard_normal((1, 4, 6, 16)).astype(np.float32)
        k = rng.standard_normal((1, 2, L, 16)).astype(np.float32)
        args = dict(budget=0, method="chunkkv-kvpress", chunk_size=chunk, keep_fraction=frac)
        got = chunkkv.select(q, k, **args)
        assert (got >= 0).all() and (np.diff(got, axis=-1) > 0).all()
        assert np.array_equal(got, real(got)), "a padded column survived"
    assert bool(calls) == trimmed
