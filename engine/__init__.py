"""The engine above `data/` and the methods: the class loop (`loop`), the predictor (`predictor`, `predict_run`),
the eval CLI runner (`runner`), the method registry (`registry`) and the `fsad` command (`cli`).

Layers, bottom up: `common/` (contract, metrics, backbones; imports nothing of ours above it) <- `data/` <- the
methods (`baseline/`, `fdsl/`, `pcsnet/`) <- `engine/` <- `api.py`, `scripts/`, `main.py`.
"""
