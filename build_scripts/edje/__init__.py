"""EDJE model code: modeling, checkpoint loading, ONNX export and the Triton repository builder.

Import submodules directly (``edje.modeling``, ``edje.build_repo``); this package's
``__init__`` stays light so that tooling can import it without loading torch.
"""

__version__ = "0.1.0"
