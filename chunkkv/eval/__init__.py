"""chunkkv.eval: the evaluation tools behind the ``chunkkv-eval`` command.

Installed with ``pip install "chunkkv[eval]"``; nothing here is imported by ``import chunkkv``.

* :mod:`~chunkkv.eval.niah`, :mod:`~chunkkv.eval.ruler`, :mod:`~chunkkv.eval.longbench`,
  :mod:`~chunkkv.eval.gsm8k`: task accuracy with the full cache and with each method and budget;
* :mod:`~chunkkv.eval.fidelity`: how close a compressed cache's outputs stay to the full cache's;
* :mod:`~chunkkv.eval.speed`: the kernels and generation, timed;
* :mod:`~chunkkv.eval.report`: BENCHMARKS.md's tables from the JSON results;
* :mod:`~chunkkv.eval.harness` (method/budget options, results files, greedy generation) and
  :mod:`~chunkkv.eval.metrics` (LongBench's metrics), shared by the tasks.

Models come from :func:`chunkkv.models.load_model` (stories260K, SmolLM2 GGUF, any local Hugging Face
folder or GGUF file), offline.
"""
