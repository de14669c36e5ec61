"""Moved to `engine.predict_run` (the predict run is engine, above `data/`); these names resolve there on first use."""

from __future__ import annotations

import importlib
from typing import Any


def __getattr__(name: str) -> Any:
    module = importlib.import_module("engine.predict_run")
    try:
        return getattr(module, name)
    except AttributeError:
        raise AttributeError(f"module 'common.predict_run' has no attribute {name!r}") from None
