"""Rules the scheduler and the worker share, so both sides agree on which step compresses what."""
from __future__ import annotations

from .config import ChunkKVConfig


def compresses_now(config: ChunkKVConfig, prompt_len: int, computed_before: int, scheduled: int) -> bool:
    """True when this step ends the request's prompt and the prompt is longer than what is kept."""
    return computed_before < prompt_len <= computed_before + scheduled and config.kept_tokens(prompt_len) is not None


def kept_blocks(kept: int, block_size: int) -> int:
    """Blocks holding ``kept`` tokens."""
    return -(-kept // block_size)
