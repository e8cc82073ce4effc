"""The shared helpers of every Python model: the batched ``execute`` rule and typed parameters.

``_shared/edje_backend_utils.py`` is imported with the stand-in ``triton_python_backend_utils``
of ``tests/triton_stub.py``; toy ``read``/``run`` functions stand for a model's own.
"""

from __future__ import annotations

import importlib
import json
import sys

import numpy as np
import pytest

from edje.build_repo import SHARED_DIR, TEMPLATE_DIR
from tests import triton_stub
from tests.triton_stub import InferenceRequest

CONFIG = {
    "name": "toy",
    "output": [
        {"name": "DOUBLED", "data_type": "TYPE_FP32", "dims": ["1"]},
        {"name": "COUNT", "data_type": "TYPE_INT64", "dims": ["1"]},
    ],
    "parameters": {
        "threads": {"string_value": "4"},
        "scale": {"string_value": "0.5"},
        "mean": {"string_value": "0.5,0.25, 1"},
        "flag": {"string_value": "True"},
        "empty": {"string_value": ""},
        "unfilled": {"string_value": "${not_filled}"},
        "word": {"string_value": "many"},
    },
}


@pytest.fixture
def utils(monkeypatch):
    """``edje_backend_utils``, freshly imported against the stand-in pb_utils."""
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", triton_stub._as_module())
    monkeypatch.syspath_prepend(str(TEMPLATE_DIR / SHARED_DIR))
    for name in ("edje_backend_utils", "edje_params"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    return importlib.import_module("edje_backend_utils")


def _request(*values: float) -> InferenceRequest:
    return InferenceRequest(X=np.array([[v] for v in values], dtype=np.float64))


class Toy:
    """A model's read/run pair: negative inputs are bad requests; ``run`` records its calls."""

    def __init__(self, utils) -> None:
        self.utils, self.calls = utils, []

    def read(self, request) -> np.ndarray:
        x = self.utils.input_array(request, "X")
        if (x < 0).any():
            raise self.utils.RequestError(f"negative value {float(x.min())}")
        return x

    def run(self, items: list[np.ndarray]) -> dict[str, np.ndarray]:
        self.calls.append([item.ravel().tolist() for item in items])
        x = np.concatenate(items)
        return {"DOUBLED": x * 2, "COUNT": np.arange(len(x))[:, None], "EXTRA": x}


def test_bad_requests_fail_alone_and_the_rest_runs_once_in_order(utils):
    toy = Toy(utils)
    batch = utils.BatchExecutor(CONFIG, read=toy.read, run=toy.run)
    requests = [_request(1, 2), _request(-1), _request(3), _request(4, -5), _request(6, 7, 8)]
    responses = batch.execute(requests)
    assert len(responses) == len(requests)
    assert [r.has_error() for r in responses] == [False, True, False, True, False]
    assert toy.calls == [[[1, 2], [3], [6, 7, 8]]]  # ONE run, only the good ones, in order
    assert responses[1].error.code() == "INVALID_ARG"
    assert responses[1].error.message() == "negative value -1.0"
    assert responses[3].error.message() == "negative value -5.0"
    np.testing.assert_array_equal(responses[0].output("DOUBLED"), [[2], [4]])
    np.testing.assert_array_equal(responses[2].output("DOUBLED"), [[6]])
    np.testing.assert_array_equal(responses[4].output("DOUBLED"), [[12], [14], [16]])
    np.testing.assert_array_equal(responses[4].output("COUNT"), [[3], [4], [5]])
    # Dtypes come from the config's data_type, whatever run returned; unlisted outputs are not sent.
    assert responses[0].output("DOUBLED").dtype == np.float32
    assert responses[0].output("COUNT").dtype == np.int64
    assert [t.name() for t in responses[0].output_tensors] == ["DOUBLED", "COUNT"]


def test_a_batch_of_only_bad_requests_never_runs(utils):
    toy = Toy(utils)
    batch = utils.BatchExecutor(CONFIG, read=toy.read, run=toy.run)
    responses = batch.execute([_request(-1), _request(-2)])
    assert [r.error.code() for r in responses] == ["INVALID_ARG", "INVALID_ARG"]
    assert toy.calls == [] and batch.execute([]) == []


def test_an_exception_in_run_fails_the_batch_not_the_model(utils):
    toy = Toy(utils)

    def broken(items):
        toy.calls.append(len(items))
        raise RuntimeError("out of memory\n  Traceback (most recent call last): ...")

    batch = utils.BatchExecutor(CONFIG, read=toy.read, run=broken)
    responses = batch.execute([_request(1), _request(-1), _request(2)])
    assert toy.calls == [2]
    assert [r.error.code() for r in responses] == ["INTERNAL", "INVALID_ARG", "INTERNAL"]
    message = responses[0].error.message()
    assert message.startswith("toy failed on this batch: RuntimeError: out of memory")
    assert len(message) < 300
    # The model keeps serving: the next batch runs as usual.
    batch.run = toy.run
    (again,) = batch.execute([_request(5)])
    np.testing.assert_array_equal(again.output("DOUBLED"), [[10]])


def test_run_must_return_every_configured_output_for_every_row(utils):
    toy = Toy(utils)
    short = utils.BatchExecutor(
        CONFIG, read=toy.read, run=lambda items: {"DOUBLED": [1], "COUNT": [1]}
    )
    missing = utils.BatchExecutor(CONFIG, read=toy.read, run=lambda items: {"DOUBLED": [1, 2]})
    (a,) = short.execute([_request(1, 2)])
    (b,) = missing.execute([_request(1, 2)])
    assert a.error.code() == b.error.code() == "INTERNAL"
    assert "output DOUBLED has 1 rows for 2" in a.error.message()
    assert "KeyError" in b.error.message()


def test_an_unexpected_error_reading_a_request_fails_only_that_request(utils):
    toy = Toy(utils)
    batch = utils.BatchExecutor(CONFIG, read=toy.read, run=toy.run)
    no_input = InferenceRequest(Y=np.zeros((1, 1)))
    not_numbers = InferenceRequest(X=np.array([["a"]], dtype=object))
    responses = batch.execute([_request(1), no_input, not_numbers, _request(2)])
    assert [r.has_error() for r in responses] == [False, True, True, False]
    assert responses[1].error.code() == "INVALID_ARG"
    assert responses[1].error.message() == "the request has no input 'X'"
    assert responses[2].error.code() == "INTERNAL"
    assert responses[2].error.message().startswith("toy could not read this request: TypeError")
    assert toy.calls == [[[1], [2]]]


def test_check_runs_after_every_read_and_can_fail_a_request_alone(utils):
    order: list[str] = []

    def read(request):
        order.append("read")
        return utils.input_array(request, "X")

    def check(x):
        order.append("check")
        if (x > 100).any():
            raise utils.RequestError("too large")
        return x

    toy = Toy(utils)
    batch = utils.BatchExecutor(CONFIG, read=read, check=check, run=toy.run)
    responses = batch.execute([_request(1), _request(500), _request(2)])
    assert order == ["read"] * 3 + ["check"] * 3
    assert [r.has_error() for r in responses] == [False, True, False]
    assert responses[1].error.message() == "too large" and toy.calls == [[[1], [2]]]


def test_rows_counts_the_rows_of_an_item(utils):
    toy = Toy(utils)
    batch = utils.BatchExecutor(
        CONFIG,
        read=lambda r: {"x": toy.read(r)},
        run=lambda items: toy.run([item["x"] for item in items]),
        rows=lambda item: len(item["x"]),
    )
    responses = batch.execute([_request(1, 2, 3), _request(4)])
    np.testing.assert_array_equal(responses[1].output("DOUBLED"), [[8]])


def test_output_dtypes_follow_the_config(utils):
    config = {"output": [{"name": "T", "data_type": "TYPE_STRING"}, *CONFIG["output"]]}
    assert utils.output_dtypes(config) == {
        "T": np.dtype(object),
        "DOUBLED": np.dtype(np.float32),
        "COUNT": np.dtype(np.int64),
    }


def test_model_config_reads_tritons_args(utils):
    assert utils.model_config({"model_config": json.dumps(CONFIG)}) == CONFIG


def test_typed_parameters(utils):
    params = utils.Parameters(CONFIG)
    assert params.get_int("threads") == 4 and params.get_int("threads", 1, minimum=1) == 4
    assert params.get_float("scale") == 0.5
    assert params.get_floats("mean") == (0.5, 0.25, 1.0)
    assert params.get_bool("flag") is True and params.get_bool("nope", False) is False
    assert params.get_str("word") == "many"
    # Missing, empty and unfilled ${...} values are unset: the default applies.
    for key in ("missing", "empty", "unfilled"):
        assert not params.is_set(key)
        assert params.get_int(key, 7) == 7 and params.get_str(key, "") == ""
        assert params.get_float(key, 1.5) == 1.5


def test_parameter_errors_name_the_model_the_key_and_the_value(utils):
    params = utils.Parameters(CONFIG)
    with pytest.raises(utils.ParameterError, match=r"toy: config.pbtxt sets no parameter 'empty'"):
        params.get_int("empty")
    with pytest.raises(utils.ParameterError, match=r"'unfilled'"):
        params.get_str("unfilled")
    with pytest.raises(ValueError, match=r"toy: parameter 'word' = 'many' is not an integer"):
        params.get_int("word")
    with pytest.raises(ValueError, match=r"'word' = 'many' is not a boolean"):
        params.get_bool("word")
    with pytest.raises(ValueError, match=r"'word' = 'many' is not a comma-separated list"):
        params.get_floats("word")
    with pytest.raises(ValueError, match=r"'threads' = 4 is below its minimum 8"):
        params.get_int("threads", minimum=8)
