"""ONNX export of a set-up detector (kNN, FDSL, PCSNet): `python -m export` (see export/cli.py)."""

from __future__ import annotations


def main(argv: list[str] | None = None) -> int:
    """The `python -m export` command (the `fsad export` entry point)."""
    from export.cli import main as cli_main

    return cli_main(argv)
