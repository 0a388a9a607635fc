"""Benchmarks run through the library: BIG-Bench Hard with LoraHub's protocol (``lorahub bbh``).

- :mod:`lorahub.bench.bbh`      the data, the split, the prompts (the protocol; no model)
- :mod:`lorahub.bench.methods`  the method registry: zero-shot, icl, best-single, lorahub-*, adapter:DIR
- :mod:`lorahub.bench.runner`   jobs (task, method, seed), resumable results, in process or on Ray
- :mod:`lorahub.bench.report`   summary.md (Table 1 style) and per_task.png
"""
