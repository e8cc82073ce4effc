"""How every EDJE Python model answers a batch (a helper copied beside each model.py).

The rule, in one place: **a bad request fails alone, the rest of the batch runs in one
vectorised pass, and no exception takes down the model.** A model gives :class:`BatchExecutor`
three functions:

* ``read(request) -> item``: take the request's inputs and check them. Raising
  :class:`RequestError` fails this request alone, with ``INVALID_ARG`` and the error's message.
* ``check(item) -> item`` (optional): a second pass, run once every request has been read, so
  that work ``read`` started (images decoding in a thread pool) overlaps across requests.
* ``run(items) -> {output name: array}``: called ONCE with the good requests' items, in order;
  each array stacks the rows of all of them (``rows(item)`` rows per item, default ``len``).

It answers one response per request, in order: the arrays split back per request, cast to the
``data_type`` of each output in the model config (``pb_utils.triton_string_to_numpy``), as in
python_backend's examples. Any other exception fails with ``INTERNAL`` and a one-line message,
never a traceback: in ``read`` or ``check`` that request only, in ``run`` the good requests of
the batch. The model keeps serving either way::

    class TritonPythonModel:
        def initialize(self, args):
            config = model_config(args)
            self.batch = BatchExecutor(config, read=self.read, run=self.run)

        def execute(self, requests):
            return self.batch.execute(requests)

Typed parameter reading (:class:`Parameters`) lives in ``edje_params.py``, re-exported here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils
from edje_params import ParameterError, Parameters, model_config

__all__ = [
    "BatchExecutor",
    "ParameterError",
    "Parameters",
    "RequestError",
    "input_array",
    "model_config",
    "output_dtypes",
]

MAX_DETAIL = 200  # characters of an unexpected exception's text in an INTERNAL message


class RequestError(ValueError):
    """A bad request; its message, safe to show the client, is returned with ``INVALID_ARG``."""


def input_array(request: Any, name: str) -> np.ndarray:
    """The request's input ``name`` as numpy (:class:`RequestError` when it is missing)."""
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        raise RequestError(f"the request has no input {name!r}")
    return tensor.as_numpy()


def output_dtypes(config: dict[str, Any]) -> dict[str, np.dtype]:
    """Each output's numpy dtype, in config order, from its ``data_type``."""
    return {
        o["name"]: np.dtype(pb_utils.triton_string_to_numpy(o["data_type"]))
        for o in config["output"]
    }


def _error(message: str, code: Any) -> Any:
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code))


def _unexpected(what: str, exc: Exception) -> str:
    return f"{what}: {type(exc).__name__}: {str(exc)[:MAX_DETAIL]}"


class BatchExecutor:
    """One model's ``execute``: read and check each request, run the good ones once, split.

    Parameters
    ----------
    config
        The model config (its ``name`` opens error messages; its outputs give names and dtypes).
    read, run, check, rows
        As described at the top of this module.
    """

    def __init__(
        self,
        config: dict[str, Any],
        read: Callable[[Any], Any],
        run: Callable[[list[Any]], Mapping[str, np.ndarray]],
        *,
        check: Callable[[Any], Any] | None = None,
        rows: Callable[[Any], int] = len,
    ) -> None:
        self.name = config.get("name") or "model"
        self.dtypes = output_dtypes(config)
        self.read, self.run, self.check, self.rows = read, run, check, rows

    def execute(self, requests: Sequence[Any]) -> list:
        """One response per request, in order; ``run`` is called at most once."""
        responses: list = [None] * len(requests)
        items: dict[int, Any] = {}  # request index -> item, for the requests still good
        for i, request in enumerate(requests):
            self._step(self.read, i, request, items, responses)
        if self.check is not None:
            for i, item in list(items.items()):
                self._step(self.check, i, item, items, responses)
        if items:
            self._run(items, responses)
        return responses

    def _step(self, step: Callable, i: int, value: Any, items: dict, responses: list) -> None:
        """``items[i] = step(value)``, or request ``i``'s error response."""
        try:
            items[i] = step(value)
            return
        except RequestError as exc:
            responses[i] = _error(str(exc), pb_utils.TritonError.INVALID_ARG)
        except Exception as exc:  # a bug must not take down the model
            what = f"{self.name} could not read this request"
            responses[i] = _error(_unexpected(what, exc), pb_utils.TritonError.INTERNAL)
        items.pop(i, None)

    def _run(self, items: dict[int, Any], responses: list) -> None:
        """Run the good requests' items once and fill their responses (INTERNAL on failure)."""
        try:
            counts = [self.rows(item) for item in items.values()]
            answers = self._split(self.run(list(items.values())), counts)
        except Exception as exc:  # keep serving: fail this batch's requests, not the model
            message = _unexpected(f"{self.name} failed on this batch", exc)
            answers = [_error(message, pb_utils.TritonError.INTERNAL) for _ in items]
        for i, answer in zip(items, answers, strict=True):
            responses[i] = answer

    def _split(self, outputs: Mapping[str, np.ndarray], counts: list[int]) -> list:
        """One response per item: its ``count`` rows of every configured output, cast."""
        arrays = {name: outputs[name] for name in self.dtypes}
        for name, array in arrays.items():
            if len(array) != sum(counts):
                raise ValueError(f"output {name} has {len(array)} rows for {sum(counts)}")
        answers, start = [], 0
        for count in counts:
            rows = slice(start, start + count)
            tensors = [
                pb_utils.Tensor(name, np.ascontiguousarray(a[rows], dtype=self.dtypes[name]))
                for name, a in arrays.items()
            ]
            answers.append(pb_utils.InferenceResponse(output_tensors=tensors))
            start += count
        return answers
