"""Typed reading of a model's ``config.pbtxt`` parameters (a helper copied beside each model.py).

Triton hands ``initialize`` the model config as JSON, where ``parameters`` maps each key to
``{"string_value": ...}``. An empty value or an unfilled ``${placeholder}`` means unset, as in
tensorrtllm_backend's models: the reader's default applies, and a reader without a default
makes the parameter required. A value that does not parse is an error naming the model, the
key and the value::

    params = Parameters(model_config(args))
    threads = params.get_int("decode_threads", 4, minimum=1)
    mean = params.get_floats("image_mean")

Only the standard library is imported here, so code outside Triton can read a built config
too (``edje_image.ImageSettings``, which the Ray indexer runs in-process).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")
REQUIRED: Any = object()  # the default of a reader whose parameter must be set
TRUE, FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


class ParameterError(ValueError):
    """A parameter that is missing or does not parse; the message names model, key and value."""


def model_config(args: dict[str, str]) -> dict[str, Any]:
    """The model's config as a dict, from the ``args`` Triton passes to ``initialize``."""
    return json.loads(args["model_config"])


def _to_bool(text: str) -> bool:
    if text.lower() not in TRUE + FALSE:
        raise ValueError(text)
    return text.lower() in TRUE


def _to_floats(text: str) -> tuple[float, ...]:
    return tuple(float(part) for part in text.split(","))


class Parameters:
    """The ``parameters`` of one model config, read with a type and a default.

    Parameters
    ----------
    config
        The model config as a dict: Triton's JSON of ``config.pbtxt``, or
        ``json_format.MessageToDict(..., preserving_proto_field_name=True)`` of it.
    """

    def __init__(self, config: dict[str, Any]) -> None:
        self.model = config.get("name") or "model"
        self.values = {
            key: str(entry.get("string_value", ""))
            for key, entry in (config.get("parameters") or {}).items()
        }

    def is_set(self, key: str) -> bool:
        """Whether ``key`` holds a value (not missing, empty or an unfilled ``${...}``)."""
        value = self.values.get(key, "")
        return bool(value) and not value.startswith("${")

    def _read(self, key: str, default: Any, parse: Callable[[str], T], kind: str) -> T:
        if not self.is_set(key):
            if default is REQUIRED:
                raise ParameterError(f"{self.model}: config.pbtxt sets no parameter {key!r}")
            return default
        value = self.values[key]
        try:
            return parse(value)
        except ValueError:
            raise ParameterError(
                f"{self.model}: parameter {key!r} = {value!r} is not {kind}"
            ) from None

    def get_str(self, key: str, default: Any = REQUIRED) -> str:
        """The value as it is written."""
        return self._read(key, default, str, "a string")

    def get_int(self, key: str, default: Any = REQUIRED, minimum: int | None = None) -> int:
        """An integer, at least ``minimum`` when one is given."""
        value = self._read(key, default, int, "an integer")
        if minimum is not None and value < minimum:
            raise ParameterError(
                f"{self.model}: parameter {key!r} = {value} is below its minimum {minimum}"
            )
        return value

    def get_float(self, key: str, default: Any = REQUIRED) -> float:
        """A floating-point number."""
        return self._read(key, default, float, "a number")

    def get_floats(self, key: str, default: Any = REQUIRED) -> tuple[float, ...]:
        """Comma-separated numbers (``0.5,0.5,0.5``)."""
        return self._read(key, default, _to_floats, "a comma-separated list of numbers")

    def get_bool(self, key: str, default: Any = REQUIRED) -> bool:
        """``1/true/yes/on`` or ``0/false/no/off``, in any case."""
        return self._read(key, default, _to_bool, "a boolean (true/false)")
