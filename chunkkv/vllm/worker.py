"""Worker side: compact each request's cache at the end of its prefill, keep positions logical afterwards.

* :class:`ChunkKVWorker` is vLLM's CPU worker with :class:`ChunkKVModelRunner` as its model runner.
* In the step that ends a compressible prompt, the runner plans one :class:`Compaction` per request; after
  each attention layer has run (its output already uses the full prompt, as in ``chunkkv.patch``), the
  layer's kept tokens are taken from the in-flight keys/values and written to the request's first slots
  with the backend's own cache-write op (``impl.do_kv_cache_update``: the in-block layout depends on
  ``layer.isa``). A reuse group's leader selects; followers only move tokens.
* From the next step on, positions stay logical (``num_computed_tokens``), while sequence lengths and slot
  mappings count stored tokens only, and the block table keeps the kept blocks (the scheduler freed the rest).
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch

from vllm.logger import init_logger
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.models.utils import extract_layer_index
from vllm.v1.worker.cpu_model_runner import CPUModelRunner
from vllm.v1.worker.cpu_worker import CPUWorker

from .config import ChunkKVConfig, parse
from .selection import select_positions
from .stepping import compresses_now, kept_blocks

logger = init_logger("vllm.chunkkv.worker")

#: environment variable: a file each rank appends its selections to (JSON lines; tests and debugging)
RECORD_ENV = "CHUNKKV_VLLM_RECORD"


@dataclass
class Compaction:
    """One request compressed in this step."""

    req_id: str
    start: int                      # its first token in the flat batch
    end: int                        # one past its last token (the prompt's end)
    kept: int                       # tokens kept per layer
    slots: torch.Tensor             # int64 [kept]: cache slots of stored positions 0..kept-1
    indices: dict[int, torch.Tensor] = field(default_factory=dict)  # reuse group -> kept positions


class ChunkKVModelRunner(CPUModelRunner):
    """vLLM's CPU model runner with ChunkKV's compaction and stored-length bookkeeping."""

    def chunkkv_setup(self) -> None:
        config = parse(self.vllm_config.additional_config)
        assert config is not None, "ChunkKVModelRunner needs additional_config['chunkkv']"
        self.chunkkv: ChunkKVConfig = config
        self.chunkkv_dropped: dict[str, int] = {}   # request -> tokens dropped from its cache
        self.chunkkv_pending: dict[str, int] = {}   # compressed in the last step: request -> kept tokens
        self.chunkkv_step: list[Compaction] = []    # this step's compactions
        self.chunkkv_layer_rank: dict[str, int] = {}
        self.chunkkv_seconds = 0.0                  # time spent selecting and moving tokens
        self.chunkkv_compactions = 0
        self.chunkkv_record = os.environ.get(RECORD_ENV) or None
        self.chunkkv_all_gather = None

    # -- setup --------------------------------------------------------------------------------------------
    def load_model(self, *args: Any, **kwargs: Any) -> None:
        super().load_model(*args, **kwargs)
        layers = {name: layer for name, layer in self.compilation_config.static_forward_context.items()
                  if isinstance(layer, Attention)}
        if not layers:
            raise ValueError("chunkkv: the model has no attention layer to compress")
        for name, layer in layers.items():
            if getattr(layer.impl, "sliding_window", -1) not in (-1, None):
                raise ValueError(f"chunkkv: layer {name} uses sliding-window attention; the vLLM integration "
                                 "compresses full-attention models only")
            if getattr(layer, "kv_sharing_target_layer_name", None):
                raise ValueError(f"chunkkv: layer {name} shares another layer's KV cache; not supported")
        order = sorted(layers, key=extract_layer_index)
        self.chunkkv_layer_rank = {name: rank for rank, name in enumerate(order)}
        for name in order:
            self._chunkkv_wrap(layers[name], self.chunkkv_layer_rank[name], last=name == order[-1])
        from vllm.distributed import get_tp_group

        tp = get_tp_group()
        if tp.world_size > 1:
            self.chunkkv_all_gather = lambda x: tp.all_gather(x, dim=0)

    def initialize_kv_cache(self, kv_cache_config: Any, *args: Any, **kwargs: Any) -> None:
        if len(kv_cache_config.kv_cache_groups) != 1:
            raise ValueError(f"chunkkv: expected one KV cache group (full attention), got "
                             f"{len(kv_cache_config.kv_cache_groups)}; hybrid models are not supported")
        super().initialize_kv_cache(kv_cache_config, *args, **kwargs)

    def _chunkkv_wrap(self, layer: Attention, rank: int, last: bool) -> None:
        impl = layer.impl
        forward = impl.forward

        def forward_then_compact(attn_layer: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                 kv_cache: torch.Tensor, attn_metadata: Any, *args: Any, **kwargs: Any) -> Any:
            out = forward(attn_layer, query, key, value, kv_cache, attn_metadata, *args, **kwargs)
            if self.chunkkv_step and attn_metadata is not None:
                self._chunkkv_compact(attn_layer, rank, query, key, value, kv_cache)
                if last:
                    self.chunkkv_step = []
            return out

        impl.forward = forward_then_compact

    # -- per step -----------------------------------------------------------------------------------------
    def _update_states(self, scheduler_output: Any) -> Any:
        for req_id in scheduler_output.finished_req_ids:
            self.chunkkv_dropped.pop(req_id, None)
            self.chunkkv_pending.pop(req_id, None)
        for req_id in scheduler_output.scheduled_cached_reqs.resumed_req_ids:
            self.chunkkv_dropped.pop(req_id, None)  # recomputed from scratch into new blocks
            self.chunkkv_pending.pop(req_id, None)
        self._chunkkv_truncate_block_tables()
        self.chunkkv_step = []
        return super()._update_states(scheduler_output)

    def _chunkkv_truncate_block_tables(self) -> None:
        """Forget the blocks past the kept tokens of the requests compressed in the last step (the scheduler
        gave them back to the pool in that step), before this step's new blocks are appended."""
        batch = self.input_batch
        for req_id, kept in self.chunkkv_pending.items():
            state = self.requests.get(req_id)
            if state is None:
                continue
            self.chunkkv_dropped[req_id] = state.num_prompt_tokens - kept
            if not self.chunkkv.free_tail:
                continue
            row = batch.req_id_to_index.get(req_id)
            for group, table in enumerate(batch.block_table.block_tables):
                keep = kept_blocks(kept, table.block_size)
                del state.block_ids[group][keep:]
                if row is not None:
                    table.num_blocks_per_row[row] = min(int(table.num_blocks_per_row[row]), keep)
        self.chunkkv_pending.clear()

    def _prepare_inputs(self, scheduler_output: Any, num_scheduled_tokens: np.ndarray) -> Any:
        batch = self.input_batch
        num_reqs = batch.num_reqs
        req_ids = batch.req_ids[:num_reqs]
        computed = batch.num_computed_tokens_cpu[:num_reqs].copy()
        prompts = batch.num_prompt_tokens[:num_reqs]
        result = super()._prepare_inputs(scheduler_output, num_scheduled_tokens)

        dropped = np.array([self.chunkkv_dropped.get(r, 0) for r in req_ids], dtype=np.int64)
        if dropped.any():
            # attention sees stored tokens only; positions (RoPE) stay logical
            offsets = torch.from_numpy(dropped)
            self.seq_lens[:num_reqs] -= offsets.to(self.seq_lens.dtype)
            self.optimistic_seq_lens_cpu[:num_reqs] -= offsets.to(self.optimistic_seq_lens_cpu.dtype)
            total = int(num_scheduled_tokens.sum())
            per_token = torch.from_numpy(np.repeat(dropped, num_scheduled_tokens))
            stored = self.positions[:total] - per_token
            batch.block_table.compute_slot_mapping(num_reqs, self.query_start_loc.gpu[: num_reqs + 1], stored)

        starts = self.query_start_loc.np
        plan = []
        for i, req_id in enumerate(req_ids):
            n = int(num_scheduled_tokens[i])
            if req_id in self.chunkkv_dropped or not compresses_now(self.chunkkv, int(prompts[i]), int(computed[i]), n):
                continue
            if computed[i] != 0:
                raise RuntimeError(f"chunkkv: request {req_id}'s prompt was split across steps ({computed[i]} "
                                   "tokens computed before); the scheduler must prefill it in one step")
            kept = self.chunkkv.kept_tokens(int(prompts[i]))
            assert kept is not None
            table = batch.block_table.block_tables[0]
            blocks = torch.from_numpy(table.block_table.np[i, : kept_blocks(kept, table.block_size)].astype(np.int64))
            pos = torch.arange(kept, dtype=torch.int64)
            slots = blocks[pos // table.block_size] * table.block_size + pos % table.block_size
            plan.append(Compaction(req_id, int(starts[i]), int(starts[i]) + int(prompts[i]), kept, slots))
            self.chunkkv_pending[req_id] = kept
        self.chunkkv_step = plan
        return result

    def _chunkkv_compact(self, layer: Any, rank: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         kv_cache: torch.Tensor) -> None:
        """Move this layer's kept tokens of every request compressed in this step to its first slots."""
        began = time.perf_counter()
        cfg = self.chunkkv
        group, member = divmod(rank, cfg.reuse)
        for c in self.chunkkv_step:
            length = c.end - c.start
            if member == 0 or group not in c.indices:
                w = cfg.window_for(length, c.kept)
                c.indices[group] = select_positions(cfg, query[c.end - w: c.end], key[c.start: c.end], c.kept,
                                                    float(layer.impl.scale), self.chunkkv_all_gather)
                self._chunkkv_log(c, rank)
            idx = c.indices[group] + c.start
            kept_k = key.index_select(0, idx)
            kept_v = value.index_select(0, idx)
            # the backend's own write (its layout depends on layer.isa); slots 0..kept-1 of this request's blocks
            layer.impl.do_kv_cache_update(layer, kept_k, kept_v, kv_cache, c.slots)
            self.chunkkv_compactions += 1
        self.chunkkv_seconds += time.perf_counter() - began

    def _chunkkv_log(self, c: Compaction, rank: int) -> None:
        if self.chunkkv_record is None:
            return
        from vllm.distributed import get_tp_group

        line = {"tp_rank": get_tp_group().rank_in_group, "req": c.req_id, "layer": rank, "length": c.end - c.start,
                "indices": c.indices[rank // self.chunkkv.reuse].tolist()}
        with open(self.chunkkv_record, "a") as f:
            f.write(json.dumps(line) + "\n")


class ChunkKVWorker(CPUWorker):
    """vLLM's CPU worker whose model runner is :class:`ChunkKVModelRunner`."""

    def init_device(self) -> None:
        super().init_device()
        if type(self.model_runner) is not CPUModelRunner:
            raise ValueError(f"chunkkv: expected vLLM's V1 CPUModelRunner, got {type(self.model_runner).__name__} "
                             "(set VLLM_USE_V2_MODEL_RUNNER=0)")
        # the runner was just built by CPUWorker; give it ChunkKV's methods (it adds no state of its own
        # beyond what chunkkv_setup sets)
        self.model_runner.__class__ = ChunkKVModelRunner
        self.model_runner.chunkkv_setup()
