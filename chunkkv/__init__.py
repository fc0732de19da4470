"""chunkkv: ChunkKV KV-cache compression with layer-wise index reuse, in C.

Core ops (NumPy arrays or torch tensors, zero-copy through DLPack):
    select, gather, compact_, compress, score, select_from_scores
transformers integration:
    patch, unpatch, cache_kwarg
"""
from .ops import (build_info, compact_, compress, gather, get_num_threads, methods, score, select,
                  select_from_scores, set_num_threads)

__version__ = "0.1.0"


def __getattr__(name: str):
    # patch/unpatch need torch and transformers: import them only when asked for
    if name in ("patch", "unpatch", "ChunkKVPatch", "cache_kwarg"):
        from . import patching as _patch_module

        return getattr(_patch_module, name)
    raise AttributeError(f"module 'chunkkv' has no attribute {name!r}")


def __dir__() -> list[str]:
    # the lazy names (__getattr__) are listed too, so dir(chunkkv) and completion show patch
    return sorted(set(globals()) | set(__all__) | {"ChunkKVPatch"})


__all__ = ["build_info", "compact_", "compress", "gather", "get_num_threads", "methods", "score", "select",
           "select_from_scores", "set_num_threads", "patch", "unpatch", "cache_kwarg", "__version__"]
