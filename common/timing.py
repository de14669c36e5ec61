"""Opt-in timing of backbone forwards: a context manager the benchmark enables, no hooks on the production path.

    with backbone_timing():           # or FSAD_TIMING=1 in the environment of an eval command
        ...                           # every Backbone forward is timed (CUDA synchronised before and after)
    common.backbones.backbone_seconds()   # the seconds counted so far

Outside the context a forward costs nothing extra: no hook is registered, no `cuda.synchronize` is called.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

ENV_FLAG = "FSAD_TIMING"  # "1": eval commands time the backbone (what scripts/benchmark.py sets for its runs)
_DEPTH = [0]


def enabled() -> bool:
    """True inside `backbone_timing()` (the backbone seconds of results.json are then measured)."""
    return _DEPTH[0] > 0


def requested() -> bool:
    """True when the environment asks eval commands to time their backbone forwards."""
    return os.environ.get(ENV_FLAG, "") == "1"


@contextlib.contextmanager
def backbone_timing() -> Iterator[None]:
    """Time every `common.backbones.Backbone` forward while the context is open (re-entrant)."""
    import torch.nn as nn

    from common.backbones import Backbone, _forward_ended, _forward_started

    if _DEPTH[0]:
        _DEPTH[0] += 1
        try:
            yield
        finally:
            _DEPTH[0] -= 1
        return

    def pre(module, inputs):
        if isinstance(module, Backbone):
            _forward_started(module, inputs)

    def post(module, inputs, output):
        if isinstance(module, Backbone):
            _forward_ended(module, inputs, output)

    handles = [nn.modules.module.register_module_forward_pre_hook(pre),
               nn.modules.module.register_module_forward_hook(post)]  # fmt: skip
    _DEPTH[0] = 1
    try:
        yield
    finally:
        _DEPTH[0] = 0
        for handle in handles:
            handle.remove()


def timing_if_requested() -> contextlib.AbstractContextManager:
    """`backbone_timing()` when FSAD_TIMING=1, else a no-op context."""
    return backbone_timing() if requested() else contextlib.nullcontext()
