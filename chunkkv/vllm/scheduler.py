"""Scheduler side: free the tail blocks of each compressed request and count its blocks from the stored length.

vLLM's ``request.num_computed_tokens`` stays LOGICAL (it drives positions, token indexing, the end-of-prefill
check and ``max_model_len``); only the number of cache slots a request needs shrinks by the tokens it
dropped. The worker (``chunkkv.vllm.worker``) compacts the cache in the same step and truncates its own
block table the same way; both sides derive the kept count from the same config and prompt length.
"""
from __future__ import annotations

from typing import Any

from vllm.logger import init_logger
from vllm.v1.core.sched.output import SchedulerOutput
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.request import Request

from .config import ChunkKVConfig, parse
from .stepping import compresses_now, kept_blocks

logger = init_logger("vllm.chunkkv.scheduler")


class ChunkKVScheduler(Scheduler):
    """vLLM's scheduler, plus: a compressible prompt is prefilled in one step (never cut), a recompute after
    preemption stops at the prompt's end (so the prompt is compressed before the outputs are recomputed, as in
    the uninterrupted run), the tail blocks go back to the pool in the step that compresses, and later
    allocations count the stored tokens only."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        config = parse(self.vllm_config.additional_config)
        assert config is not None, "ChunkKVScheduler needs additional_config['chunkkv']"
        self.chunkkv: ChunkKVConfig = config
        self.chunkkv_dropped: dict[str, int] = {}  # request id -> tokens dropped from its cache
        self.chunkkv_max_running = 0
        self.chunkkv_preemptions = 0
        self.chunkkv_max_blocks_used = 0
        manager = self.kv_cache_manager
        original_allocate = manager.allocate_slots

        def allocate_slots(request: Request, *a: Any, **kw: Any) -> Any:
            dropped = self.chunkkv_dropped.get(request.request_id, 0)
            if not dropped:
                return original_allocate(request, *a, **kw)
            # count the slots from the stored length: logical tokens minus dropped ones
            request.num_computed_tokens -= dropped
            try:
                return original_allocate(request, *a, **kw)
            finally:
                request.num_computed_tokens += dropped

        manager.allocate_slots = allocate_slots

    # -- what to schedule ---------------------------------------------------------------------------
    def _reserve_prefill_lookahead(self, request: Request, num_computed_tokens: int, num_new_tokens: int) -> int:
        num_new_tokens = super()._reserve_prefill_lookahead(request, num_computed_tokens, num_new_tokens)
        prompt = request.num_prompt_tokens
        if num_computed_tokens >= prompt or self.chunkkv.kept_tokens(prompt) is None:
            return num_new_tokens
        if num_computed_tokens + num_new_tokens < prompt:
            return 0  # the whole prompt's keys must be in one step to score it: wait for room
        return prompt - num_computed_tokens  # a recompute: the prompt first, compressed, then its outputs

    def schedule(self, *args: Any, **kwargs: Any) -> SchedulerOutput:
        output = super().schedule(*args, **kwargs)
        for req_id, n in output.num_scheduled_tokens.items():
            request = self.requests[req_id]
            if compresses_now(self.chunkkv, request.num_prompt_tokens, request.num_computed_tokens - n, n) \
                    and req_id not in self.chunkkv_dropped:
                self._free_tail(request)
        self.chunkkv_max_running = max(self.chunkkv_max_running, len(self.running))
        pool = self.kv_cache_manager.block_pool
        self.chunkkv_max_blocks_used = max(self.chunkkv_max_blocks_used,
                                           pool.num_gpu_blocks - 1 - pool.get_num_free_blocks())
        return output

    def _free_tail(self, request: Request) -> None:
        """Give the blocks past the kept tokens back to the pool (the worker compacts into the first ones in
        this step, before any later step can reuse them)."""
        kept = self.chunkkv.kept_tokens(request.num_prompt_tokens)
        assert kept is not None
        self.chunkkv_dropped[request.request_id] = request.num_prompt_tokens - kept
        if not self.chunkkv.free_tail:
            return
        for manager in self.kv_cache_manager.coordinator.single_type_managers:
            blocks = manager.req_to_blocks[request.request_id]
            keep = kept_blocks(kept, manager.block_size)
            tail = blocks[keep:]
            del blocks[keep:]
            if request.request_id in manager.num_cached_block:
                manager.num_cached_block[request.request_id] = min(manager.num_cached_block[request.request_id], keep)
            manager.block_pool.free_blocks(reversed(tail))

    def _preempt_request(self, request: Request, *args: Any, **kwargs: Any) -> None:
        self.chunkkv_preemptions += 1
        super()._preempt_request(request, *args, **kwargs)

    # -- every way a request's blocks are freed (finish, abort, preemption) ----------------------------
    def _free_request_blocks(self, request: Request) -> None:
        self.chunkkv_dropped.pop(request.request_id, None)
        super()._free_request_blocks(request)
