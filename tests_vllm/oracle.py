"""The transformers side of the oracle, and helpers to run engines in their own processes."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional

HERE = Path(__file__).resolve().parent


def hf_greedy(model: Any, prompt: list[int], max_tokens: int, patch: Optional[dict] = None) -> list[int]:
    """Greedy fp32 tokens from transformers, compressed by ``chunkkv.patch(**patch)`` when given (EOS ignored,
    as vLLM's ``ignore_eos``)."""
    import torch
    from transformers import DynamicCache

    import chunkkv

    handle = chunkkv.patch(model, **patch) if patch else None
    try:
        with torch.no_grad():
            cache = DynamicCache()
            ids = torch.tensor([prompt])
            out: list[int] = []
            logits = model(input_ids=ids, past_key_values=cache, use_cache=True).logits
            for _ in range(max_tokens):
                token = int(logits[0, -1].argmax())
                out.append(token)
                logits = model(input_ids=torch.tensor([[token]]), past_key_values=cache, use_cache=True).logits
            return out
    finally:
        if handle is not None:
            handle.remove()


def run_engine(spec: dict, timeout: int = 900, env: Optional[dict] = None) -> dict:
    """Start tests_vllm/engine_run.py on ``spec`` in a fresh process; its JSON result."""
    with tempfile.TemporaryDirectory() as tmp:
        spec_path, out_path = Path(tmp) / "spec.json", Path(tmp) / "out.json"
        spec_path.write_text(json.dumps(spec))
        proc = subprocess.run([sys.executable, str(HERE / "engine_run.py"), str(spec_path), str(out_path)],
                              capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})
        if proc.returncode != 0:
            raise RuntimeError(f"engine run failed ({proc.returncode}):\n{proc.stderr[-6000:]}")
        return json.loads(out_path.read_text())
