"""The ``vllm.general_plugins`` entry point: turn the integration on when ``additional_config`` asks for it.

vLLM loads general plugins in every process; :func:`register` only wraps ``EngineArgs.create_engine_config``
(once per process). Without a ``chunkkv`` key the wrapper calls vLLM's own function and returns its result
untouched. With one, the ``chunkkv`` options are checked and the engine is set up at start:

* ``scheduler_cls`` -> :class:`chunkkv.vllm.scheduler.ChunkKVScheduler`,
  ``worker_cls`` -> :class:`chunkkv.vllm.worker.ChunkKVWorker` (vLLM's CPU backend);
* prefix caching is turned off with a warning (compacted blocks hold another request's positions);
* ``max_num_batched_tokens`` is raised to ``max_model_len`` with a warning when smaller: a compressible
  prompt is prefilled in one step (its keys must all be in flight when it is scored); chunked prefill stays
  on for everything else;
* speculative decoding, pipeline parallelism, ``long_prefill_token_threshold``, other platforms, and a
  ``scheduler_cls`` / ``worker_cls`` of the user's own are refused with an error naming the setting.
"""
from __future__ import annotations

import functools
from typing import Any

from .config import ChunkKVConfigError, parse

SCHEDULER_CLS = "chunkkv.vllm.scheduler.ChunkKVScheduler"
WORKER_CLS = "chunkkv.vllm.worker.ChunkKVWorker"
_MARK = "_chunkkv_wrapped"


def _logger() -> Any:
    from vllm.logger import init_logger

    return init_logger("vllm.chunkkv")


def register() -> None:
    """Entry point of the ``vllm.general_plugins`` group (idempotent)."""
    from vllm.engine.arg_utils import EngineArgs

    original = EngineArgs.create_engine_config
    if getattr(original, _MARK, False):
        return

    @functools.wraps(original)
    def create_engine_config(self: Any, *args: Any, **kwargs: Any) -> Any:
        config = parse(self.additional_config)
        if config is None:
            return original(self, *args, **kwargs)
        prepare_engine_args(self)
        vllm_config = original(self, *args, **kwargs)
        max_len = vllm_config.model_config.max_model_len
        if vllm_config.scheduler_config.max_num_batched_tokens < max_len:
            _logger().warning(
                "chunkkv: max_num_batched_tokens raised from %d to max_model_len (%d): a prompt is scored and "
                "compressed when its last token is computed, so it is prefilled in one step",
                vllm_config.scheduler_config.max_num_batched_tokens, max_len)
            self.max_num_batched_tokens = max_len
            vllm_config = original(self, *args, **kwargs)
        check_engine_config(vllm_config)
        _logger().info("chunkkv: compressing every prefill with %s", config)
        return vllm_config

    setattr(create_engine_config, _MARK, True)
    EngineArgs.create_engine_config = create_engine_config


def prepare_engine_args(args: Any) -> None:
    """Refuse what cannot work with compaction, and set the scheduler, worker and prefix caching."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        raise ChunkKVConfigError(f"chunkkv: the vLLM integration runs on vLLM's CPU backend only (this platform is "
                                 f"{current_platform.device_name!r}); see the README for the GPU status")
    if args.speculative_config:
        raise ChunkKVConfigError("chunkkv: speculative_config is set; speculative decoding builds its own slot "
                                 "mappings and is not supported with chunkkv")
    if args.pipeline_parallel_size > 1:
        raise ChunkKVConfigError("chunkkv: pipeline_parallel_size > 1 is not supported (a reuse group must not "
                                 "span stages); use tensor_parallel_size")
    if args.long_prefill_token_threshold:
        raise ChunkKVConfigError("chunkkv: long_prefill_token_threshold must be 0: a compressible prompt is "
                                 "prefilled in one step")
    if args.scheduler_cls not in (None, SCHEDULER_CLS):
        raise ChunkKVConfigError(f"chunkkv: scheduler_cls={args.scheduler_cls!r}; chunkkv needs its own "
                                 f"({SCHEDULER_CLS})")
    if args.worker_cls not in ("auto", WORKER_CLS):
        raise ChunkKVConfigError(f"chunkkv: worker_cls={args.worker_cls!r}; chunkkv needs its own ({WORKER_CLS})")
    args.scheduler_cls = SCHEDULER_CLS
    args.worker_cls = WORKER_CLS
    if args.enable_prefix_caching is not False:
        _logger().warning("chunkkv: enable_prefix_caching turned off: compressed requests hold compacted blocks "
                          "that must not be shared through the prefix cache")
        args.enable_prefix_caching = False


def check_engine_config(vllm_config: Any) -> None:
    """What can only be checked on the finished config."""
    if vllm_config.speculative_config is not None:
        raise ChunkKVConfigError("chunkkv: speculative_config is set; speculative decoding is not supported")
    if vllm_config.cache_config.enable_prefix_caching:
        raise ChunkKVConfigError("chunkkv: enable_prefix_caching must be False")
    if vllm_config.scheduler_config.scheduler_cls != SCHEDULER_CLS:
        raise ChunkKVConfigError(f"chunkkv: scheduler_cls became {vllm_config.scheduler_config.scheduler_cls!r}")
    if vllm_config.parallel_config.worker_cls != WORKER_CLS:
        raise ChunkKVConfigError(f"chunkkv: worker_cls became {vllm_config.parallel_config.worker_cls!r}")
