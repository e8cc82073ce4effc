"""Helpers shared by EDJE's Python-backend models (copied next to each ``model.py``)."""

from __future__ import annotations

import json
from typing import Any


def get_parameter(model_config: dict[str, Any], key: str, default: str | None = None) -> str | None:
    """A ``parameters`` entry of ``config.pbtxt``; empty or unfilled ``${...}`` means unset."""
    value = model_config.get("parameters", {}).get(key, {}).get("string_value", "")
    if not value or value.startswith("${"):
        return default
    return value


def parse_model_config(args: dict[str, str]) -> dict[str, Any]:
    """The model's config as a dict, from the ``args`` Triton passes to ``initialize``."""
    return json.loads(args["model_config"])
