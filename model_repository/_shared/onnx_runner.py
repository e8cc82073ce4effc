"""An ONNX model run by ONNX Runtime inside Triton's Python backend (the ``python`` runtime).

Triton's ``onnxruntime`` backend is not in the embedded server, so in that runtime each ONNX
model's ``1/model.py`` is the one line ``from onnx_runner import TritonPythonModel``: same
inputs, outputs and dynamic batching as the ``onnxruntime`` runtime, where the builder drops
the Python files and Triton runs ``model.onnx`` itself. All good requests of one ``execute``
are concatenated and run in ONE session call (``edje_backend_utils.BatchExecutor``); a request
whose floating-point inputs hold NaN or Inf fails alone with ``INVALID_ARG``.

Config parameters: ``onnx_file`` (default ``model.onnx``); ``intra_op_thread_count`` (0 = ORT's
default; the same key Triton's ``onnxruntime`` backend reads); ``allow_spinning`` (a boolean,
default true = ORT's default: idle pool threads spin-wait for the next work instead of sleeping;
it sets :data:`SPINNING_KEYS`; Triton's ``onnxruntime`` backend does not read this key); and
``trim_padding`` naming a [B,L] mask input: trailing columns that are padding in every row are cut
before the run, which changes no result (padding sits at the end).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
from edje_backend_utils import BatchExecutor, Parameters, RequestError, input_array, model_config

# ONNX Runtime's session config entries for spin-waiting, intra-op and inter-op pools ("1"/"0").
SPINNING_KEYS = ("session.intra_op.allow_spinning", "session.inter_op.allow_spinning")


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
        config = model_config(args)
        params = Parameters(config)
        path = Path(__file__).parent / params.get_str("onnx_file", "model.onnx")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = params.get_int("intra_op_thread_count", 0, minimum=0)
        options.inter_op_num_threads = 1
        spinning = "1" if params.get_bool("allow_spinning", True) else "0"
        for key in SPINNING_KEYS:
            options.add_session_config_entry(key, spinning)
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_names = [i["name"] for i in config["input"]]
        self.output_names = [o["name"] for o in config["output"]]
        self.trim_mask = params.get_str("trim_padding", "")
        self.batch = BatchExecutor(
            config, read=self.read, run=self.run, rows=lambda feeds: len(feeds[self.input_names[0]])
        )

    def execute(self, requests: list) -> list:
        """One response per request, in order: all valid ones in one ONNX Runtime call."""
        return self.batch.execute(requests)

    def read(self, request) -> dict[str, np.ndarray]:
        """The request's inputs; :class:`RequestError` naming the first with NaN or Inf."""
        feeds = {name: input_array(request, name) for name in self.input_names}
        for name, array in feeds.items():
            bad = np.flatnonzero(non_finite_rows(array))
            if bad.size:
                raise RequestError(
                    f"input '{name}' holds NaN or Inf (row {int(bad[0])} of {len(array)})"
                )
        return feeds

    def run(self, items: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        """One session run over the concatenated inputs (trailing padding trimmed)."""
        feeds = {n: np.concatenate([item[n] for item in items]) for n in self.input_names}
        if self.trim_mask:
            feeds = trim_trailing_padding(feeds, self.trim_mask)
        outputs = self.session.run(self.output_names, feeds)
        return dict(zip(self.output_names, outputs, strict=True))
