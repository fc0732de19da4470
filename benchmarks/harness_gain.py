#!/usr/bin/env python3
"""What the evaluation harness's generation engine (chunkkv/eval/harness.py) saves, measured.

One NIAH-like prompt, the jobs one NIAH cell runs (the full cache, then each method at each budget), greedy,
on one thread (torch and the C core), after a warm-up, generated four ways; every way's outputs must be equal:

  generate       model.generate per job under chunkkv.patch (every job prefills the whole prompt)
  loop           the engine without prefix sharing or batching (a per-job greedy loop)
  shared         prefix sharing only: the unpatched prefill of prompt[:-window] once, per job only the tail
  shared+batch   prefix sharing and batched decoding (the default)
  no-lcp         the default, but prompts that differ do not share their common beginning (with --depths
                 a,b,...: one prompt per needle depth, as a NIAH length does)

    OMP_NUM_THREADS=1 python benchmarks/harness_gain.py --model smollm2 --tokens 1500
"""
import argparse
import os
import sys
import time

import torch

import chunkkv
from chunkkv.eval import harness as C


class _NoLcpEngine(C.Engine):
    """Prefix sharing between the jobs of one prompt only: a new prompt prefills from scratch."""

    def prefix_cache(self, prefix):
        if list(prefix) != self._prefix_ids:
            self._prefix_cache = None
        return super().prefix_cache(prefix)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--tokens", type=int, default=1500, help="prompt tokens")
    p.add_argument("--new-tokens", type=int, default=24)
    p.add_argument("--methods", default="full,chunkkv,chunkkv:reuse=2,snapkv,streamingllm")
    p.add_argument("--budgets", default="0.1")
    p.add_argument("--depths", default="0.4", help="needle depths, one prompt each (comma list)")
    p.add_argument("--ways", default="generate,loop,shared,shared+batch")
    args = p.parse_args(argv)
    torch.set_grad_enabled(False)
    torch.set_num_threads(1)
    chunkkv.set_num_threads(1)
    model, tok = C.load(args.model)
    hay = C.Haystack(tok, C.haystack_text(None, 8 * args.tokens))
    needle = "The pass key is 31415. Remember it."
    prompts = [C.fit_prompt(hay, lambda ctx: C.encode_prompt(tok, ctx + "\nWhat is the pass key?",
                                                             answer_prefix="The pass key is"),
                            args.tokens, [(float(d), needle)]) for d in args.depths.split(",")]
    specs = C.parse_methods(args.methods)
    jobs = [C.Job(f"{i}|{s.label}|{C.budget_label(b)}", ids, s, b, args.new_tokens)
            for i, ids in enumerate(prompts) for s, b in C.runs(specs, C.parse_budgets(args.budgets))]
    print(f"{args.model}: {len(prompts)} prompt(s) of {len(prompts[0])} tokens, {len(jobs)} jobs x "
          f"{args.new_tokens} new tokens, "
          f"1 thread (OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')})", flush=True)
    C.Engine(model, tok, progress=False).run(jobs[:2])  # warm-up: allocations, thread pools, kernel choice
    results = {}
    for way in args.ways.split(","):
        t0 = time.perf_counter()
        if way == "generate":
            eos = C.stop_token_ids(model, tok)
            outs = {}
            for job in jobs:
                x = torch.tensor([job.ids])
                with C.patch_context(model, job.spec, job.budget):
                    y = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=job.max_new_tokens,
                                       do_sample=False, pad_token_id=tok.pad_token_id)
                y = y[0, x.shape[1]:].tolist()
                cut = next((i for i, t in enumerate(y) if t in eos), len(y))
                outs[job.key] = y[:cut]
        else:
            cls = _NoLcpEngine if way == "no-lcp" else C.Engine
            engine = cls(model, tok, share_prefix=way != "loop", batch_size=1 if way in ("loop", "shared") else 16,
                         progress=False)
            outs = {k: o.tokens for k, o in engine.run(jobs).items()}
        secs = time.perf_counter() - t0
        results[way] = (secs, outs)
        print(f"{way:<14} {secs:7.1f} s", flush=True)
    ref_way = next(iter(results))
    for way, (secs, outs) in results.items():
        same = outs == results[ref_way][1]
        print(f"{way:<14} {secs:7.1f} s  x{results[ref_way][0] / secs:5.2f} vs {ref_way}  outputs equal: {same}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
