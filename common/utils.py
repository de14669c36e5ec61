"""Small shared helpers: seeding, device parsing, atomic writes and the one-line CLI error convention."""

from __future__ import annotations

import functools
import json
import os
import random
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


EXIT_BAD_INPUT = 2
_UMASK = os.umask(0)
os.umask(_UMASK)


class UserError(Exception):
    """A problem with the user's input (paths, arguments, files). Printed as one line, exit code 2."""


# torch and numpy are imported inside the functions that need them: the data/ generators use this module and
# should start in a fraction of a second.


def set_seed(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA) global generators."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def parse_device(device: str | int | None) -> torch.device:
    """Map `cpu`, `0`, `cuda`, `cuda:1` (or None = best available) to a torch.device.

    A CUDA index on a machine without CUDA is a user error, not a silent fallback.
    """
    import torch

    if device is None or str(device).strip() == "":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    text = str(device).strip().lower()
    if text == "cpu":
        return torch.device("cpu")
    if text.isdigit():
        text = f"cuda:{text}"
    if text.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"device '{device}' asks for CUDA but no CUDA device is available here; use --device cpu")
        return torch.device(text)
    raise UserError(f"unknown device '{device}': use cpu, a CUDA index such as 0, or cuda:N")


def parse_int_list(text: str | None, flag: str) -> list[int] | None:
    """'2,3' -> [2, 3]; None or '' -> None; anything else is a UserError naming the flag."""
    if not text:
        return None
    try:
        return [int(x) for x in text.split(",")]
    except ValueError as exc:
        raise UserError(f"{flag} {text!r} must be comma-separated integers") from exc


def _atomic_write(path: str | os.PathLike, write: Callable[[Any], None], mode: str) -> Path:
    """Write through a temporary file in the same folder, fsync, then rename over the target."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give results the usual permissions
        with os.fdopen(fd, mode) as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return _atomic_write(path, lambda fh: fh.write(text), "w")


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int = 4) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=indent) + "\n")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return _atomic_write(path, lambda fh: fh.write(data), "wb")


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    import torch

    return _atomic_write(path, lambda fh: torch.save(obj, fh), "wb")


def check_writable_dir(path: str | os.PathLike) -> Path:
    """Create `path` if needed and check it can be written, raising UserError otherwise."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create output folder {path}: {exc.strerror or exc}") from exc
    if not os.access(path, os.W_OK):
        raise UserError(f"output folder {path} is not writable")
    return path


def cli_entry(main: Callable[..., int | None]) -> Callable[..., int]:
    """Decorate a CLI `main`: user errors become one line on stderr and exit code 2, no traceback."""

    @functools.wraps(main)
    def wrapper(*args: Any, **kwargs: Any) -> int:
        try:
            code = main(*args, **kwargs)
        except UserError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_BAD_INPUT
        except KeyboardInterrupt:
            print("error: interrupted", file=sys.stderr)
            return 130
        except OSError as exc:  # disk full, permissions, ... named with the file involved
            where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
            print(f"error: {exc.strerror or exc}{where}", file=sys.stderr)
            return EXIT_BAD_INPUT
        return int(code or 0)

    return wrapper
