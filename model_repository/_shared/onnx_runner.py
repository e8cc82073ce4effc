"""An ONNX model run by ONNX Runtime inside Triton's Python backend (the ``python`` runtime).

Triton's ``onnxruntime`` backend is not in the embedded server, so each ONNX model gets this
``model.py``: same inputs, outputs and dynamic batching as the ``onnxruntime`` runtime. All
requests of one ``execute`` call are concatenated and run in ONE session call. A request whose
floating-point inputs hold NaN or Inf fails alone with ``INVALID_ARG``.

Config parameters: ``onnx_file`` (default ``model.onnx``); ``intra_op_thread_count`` (0 = ORT's
default; the same key Triton's ``onnxruntime`` backend reads); and ``trim_padding`` naming a [B,L]
mask input: trailing columns that are padding in every row are cut before the run, which changes
no result (padding sits at the end).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils
from edje_backend_utils import get_parameter, parse_model_config


def trim_trailing_padding(feeds: dict[str, np.ndarray], mask_name: str) -> dict[str, np.ndarray]:
    """Cut the columns after the longest row's last real token from every [B,L] input."""
    mask = feeds[mask_name]
    length = mask.shape[1]
    used = int(mask.sum(axis=1).max()) if mask.size else length
    if used >= length:
        return feeds
    return {
        name: a[:, :used] if a.ndim == 2 and a.shape[1] == length else a
        for name, a in feeds.items()
    }


def non_finite_rows(array: np.ndarray) -> np.ndarray:
    """Boolean [B]: rows of a float array that hold NaN or Inf."""
    if not np.issubdtype(array.dtype, np.floating):
        return np.zeros(array.shape[0], dtype=bool)
    return ~np.isfinite(array.reshape(array.shape[0], -1)).all(axis=1)


class TritonPythonModel:
    """Triton Python model running one ONNX graph with ONNX Runtime."""

    def initialize(self, args: dict[str, str]) -> None:
        """Create the ONNX Runtime session once."""
        config = parse_model_config(args)
        path = Path(__file__).parent / get_parameter(config, "onnx_file", "model.onnx")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = int(get_parameter(config, "intra_op_thread_count", "0"))
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_names = [i["name"] for i in config["input"]]
        self.output_names = [o["name"] for o in config["output"]]
        self.trim_mask = get_parameter(config, "trim_padding")

    def execute(self, requests: list) -> list:
        """Run every valid request of the batch in one ONNX Runtime call."""
        arrays = [
            {n: pb_utils.get_input_tensor_by_name(r, n).as_numpy() for n in self.input_names}
            for r in requests
        ]
        responses: list = [None] * len(requests)
        for i, feeds in enumerate(arrays):
            for name, array in feeds.items():
                bad = np.flatnonzero(non_finite_rows(array))
                if bad.size:
                    msg = f"input '{name}' holds NaN or Inf (row {int(bad[0])} of {len(array)})"
                    err = pb_utils.TritonError(msg, pb_utils.TritonError.INVALID_ARG)
                    responses[i] = pb_utils.InferenceResponse(error=err)
                    break
        valid = [i for i, r in enumerate(responses) if r is None]
        if not valid:
            return responses
        feeds = {n: np.concatenate([arrays[i][n] for i in valid]) for n in self.input_names}
        if self.trim_mask:
            feeds = trim_trailing_padding(feeds, self.trim_mask)
        try:
            outputs = self.session.run(self.output_names, feeds)
        except Exception as exc:  # keep serving: fail this batch's requests, not the model
            msg = f"ONNX Runtime failed on this batch: {type(exc).__name__}: {str(exc)[:200]}"
            for i in valid:
                err = pb_utils.TritonError(msg, pb_utils.TritonError.INTERNAL)
                responses[i] = pb_utils.InferenceResponse(error=err)
            return responses
        start = 0
        for i in valid:
            end = start + len(arrays[i][self.input_names[0]])
            tensors = [
                pb_utils.Tensor(name, np.ascontiguousarray(out[start:end]))
                for name, out in zip(self.output_names, outputs, strict=True)
            ]
            responses[i] = pb_utils.InferenceResponse(output_tensors=tensors)
            start = end
        return responses
