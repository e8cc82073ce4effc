"""Tools that run on the library: benchmarks, the demo and diagnostic probes.

``python -m edje.tools.demo`` (``make demo``), ``python -m edje.tools.bench`` (``make bench``;
``bench_collections`` and ``bench_first_stage`` are its storage and first-stage parts),
``python -m edje.tools.gpu_bench`` (one command on a CUDA machine), and
``python -m edje.tools.probes`` (what a ViT's features carry, whether a joint encoder uses its
image). Nothing in the library or in training imports from here.
"""
