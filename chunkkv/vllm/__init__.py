"""ChunkKV inside vLLM: prefill compression in vLLM's paged KV cache (CPU backend).

Turned on with vLLM's own configuration only::

    LLM(model=path, additional_config={"chunkkv": {"budget": 512, "window": 32, "chunk_size": 10, "reuse": 2}})
    vllm serve PATH --additional-config '{"chunkkv": {"keep_ratio": 0.1}}'

``chunkkv.vllm.plugin:register`` is the ``vllm.general_plugins`` entry point; without a ``chunkkv``
key in ``additional_config`` it changes nothing. Importing this package does not import vLLM.
"""
