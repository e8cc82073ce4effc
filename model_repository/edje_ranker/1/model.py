"""edje_ranker (MiniLM joint encoder + head) in the embedded ``python`` runtime.

``model.onnx`` beside this file runs in ONNX Runtime through the shared ``onnx_runner.py``
(copied here by the builder). In the ``onnxruntime`` runtime the builder leaves the Python
files out: Triton's ONNX Runtime backend runs ``model.onnx`` itself.
"""

from onnx_runner import TritonPythonModel  # noqa: F401
