"""A stand-in for ``triton_python_backend_utils``, to unit-test Python models in-process.

It mirrors only the calls our models make (the shared helpers' included). Importing a model
through :func:`load_model` puts this module under the real module's name and the model's own
version directory (``model.py`` with the helpers the builder copied beside it) on ``sys.path``.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import types
from pathlib import Path

import numpy as np


class TritonError:
    INVALID_ARG = "INVALID_ARG"
    INTERNAL = "INTERNAL"

    def __init__(self, message: str, code: str = INTERNAL) -> None:
        self._message, self._code = message, code

    def message(self) -> str:
        return self._message

    def code(self) -> str:
        return self._code


class Tensor:
    def __init__(self, name: str, array: np.ndarray) -> None:
        self._name, self._array = name, np.asarray(array)

    def name(self) -> str:
        return self._name

    def as_numpy(self) -> np.ndarray:
        return self._array


class InferenceResponse:
    def __init__(
        self, output_tensors: list[Tensor] | None = None, error: TritonError | None = None
    ):
        self.output_tensors = output_tensors or []
        self.error = error

    def has_error(self) -> bool:
        return self.error is not None

    def output(self, name: str) -> np.ndarray:
        return next(t.as_numpy() for t in self.output_tensors if t.name() == name)


class InferenceRequest:
    def __init__(self, **inputs: np.ndarray) -> None:
        self.inputs = {k: Tensor(k, v) for k, v in inputs.items()}


def get_input_tensor_by_name(request: InferenceRequest, name: str) -> Tensor | None:
    return request.inputs.get(name)


def get_output_config_by_name(model_config: dict, name: str) -> dict | None:
    return next((o for o in model_config.get("output", []) if o["name"] == name), None)


TRITON_STRING_TO_NUMPY = {
    "TYPE_BOOL": bool,
    "TYPE_UINT8": np.uint8,
    "TYPE_INT32": np.int32,
    "TYPE_INT64": np.int64,
    "TYPE_FP16": np.float16,
    "TYPE_FP32": np.float32,
    "TYPE_FP64": np.float64,
    "TYPE_STRING": np.object_,
}


def triton_string_to_numpy(triton_type_string: str):
    return TRITON_STRING_TO_NUMPY[triton_type_string]


API = (
    "TritonError",
    "Tensor",
    "InferenceResponse",
    "get_input_tensor_by_name",
    "get_output_config_by_name",
    "triton_string_to_numpy",
)


def _as_module() -> types.ModuleType:
    module = types.ModuleType("triton_python_backend_utils")
    for name in API:
        setattr(module, name, globals()[name])
    return module


def read_config(model_dir: Path) -> dict:
    """``config.pbtxt`` parsed against Triton's ModelConfig, as the JSON Triton hands a model."""
    from google.protobuf import json_format, text_format
    from tritonclient.grpc import model_config_pb2

    message = text_format.Parse(
        (model_dir / "config.pbtxt").read_text(), model_config_pb2.ModelConfig()
    )
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


def load_model(model_dir: Path, **parameter_overrides: str):
    """Import ``model_dir/1/model.py`` and ``initialize`` it with its built ``config.pbtxt``."""
    sys.modules["triton_python_backend_utils"] = _as_module()
    version_dir = model_dir / "1"
    sys.path.insert(0, str(version_dir))
    try:
        for helper in version_dir.glob("*.py"):  # fresh helpers, bound to this stand-in
            sys.modules.pop(helper.stem, None)
        spec = importlib.util.spec_from_file_location(
            f"{model_dir.name}_model", version_dir / "model.py"
        )
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(version_dir))
    config = read_config(model_dir)
    for key, value in parameter_overrides.items():
        config["parameters"][key] = {"string_value": value}
    model = module.TritonPythonModel()
    model.initialize({"model_config": json.dumps(config), "model_repository": str(model_dir)})
    return model, module
