"""EDJE, the torch side, in three layers.

* **The library** (this package's modules): ``configuration`` (the shape contract),
  ``modeling``, ``checkpoint``, ``model_source``, ``onnx_export``, ``build_repo`` (the Triton
  repository builder), ``synthetic`` (the synthetic world) and ``tiny`` (tiny models for tests).
* **Training** (``edje.training``; command line ``python -m edje.train``) builds on the library.
* **Tools** (``edje.tools``: demo, benchmarks, probes) use both; nothing imports from them.

Import submodules directly (``edje.modeling``, ``edje.build_repo``); this package's
``__init__`` stays light so that tooling can import it without loading torch.
"""

__version__ = "0.1.0"
