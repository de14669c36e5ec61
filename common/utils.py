"""Small shared helpers: seeding, device parsing, atomic writes and the one-line CLI error convention."""

from __future__ import annotations

import errno
import functools
import json
import os
import random
import re
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


def capturing_graph() -> bool:
    """True while torch records a graph (ONNX export, `torch.jit.trace`, `torch.export`/`torch.compile`).

    Code with a faster path outside torch (faiss, OpenCV) takes its torch path then: an outside call cannot be
    recorded, and the torch path computes the same values (export/ relies on this; tests/test_export.py checks it).
    """
    import torch

    return bool(torch.onnx.is_in_onnx_export() or torch.jit.is_tracing() or torch.compiler.is_compiling())


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


PRECISIONS = ("fp32", "bf16", "fp16")  # backbone forward: float32 or autocast (common.backbones)


def resolve_workers(num_workers: int | None, device: torch.device | str = "cpu", flag: str = "--num-workers") -> int:
    """DataLoader workers: the number given, or by default 0 on CPU and CPUs - 1 (at most 4) on CUDA.

    On CPU the model already uses every core: a decoding process competes with it (2-core A/B, brick k=4, two
    repeats: kNN 26.3 -> 24.8, FDSL 21.3 -> 19.1, PCSNet 22.9 -> 18.2 img/s with 1 worker). On CUDA the CPU is
    otherwise idle, so decoding moves off the main thread."""
    if num_workers is None:
        import torch

        if torch.device(device).type != "cuda":
            return 0
        try:
            cpus = len(os.sched_getaffinity(0))
        except AttributeError:  # not Linux
            cpus = os.cpu_count() or 1
        return max(0, min(4, cpus - 1))
    if num_workers < 0:
        raise UserError(f"{flag} must be 0 or more (got {num_workers})")
    return int(num_workers)


def parse_int_list(text: str | None, flag: str) -> list[int] | None:
    """'2,3' -> [2, 3]; None or '' -> None; anything else is a UserError naming the flag."""
    if not text:
        return None
    try:
        return [int(x) for x in text.split(",")]
    except ValueError as exc:
        raise UserError(f"{flag} {text!r} must be comma-separated integers") from exc


def _write_error(path: Path, exc: OSError) -> str:
    """One line for a failed write of `path`: the OS reason and what to do about it."""
    reason = exc.strerror or str(exc)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        hint = "free some disk space (or choose another output folder) and run again"
    elif exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        hint = "choose a writable output folder"
    else:
        hint = "check the output folder"
    return f"cannot write {path}: {reason}; {hint} (an earlier {path.name}, if any, is unchanged)"


def _atomic_write(path: str | os.PathLike, write: Callable[[Any], None], mode: str) -> Path:
    """Write through a temporary file in the same folder, fsync, then rename over the target.

    Raises:
        UserError: the folder cannot be written (read-only, disk full, ...), naming `path`; no partial file is
            left behind and an existing `path` is untouched.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise UserError(_write_error(path, exc)) from exc
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give results the usual permissions
        with os.fdopen(fd, mode) as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise UserError(_write_error(path, exc)) from exc
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return _atomic_write(path, lambda fh: fh.write(text), "w")


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int = 4) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=indent) + "\n")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return _atomic_write(path, lambda fh: fh.write(data), "wb")


class _WriteRecorder:
    """A binary file wrapper that remembers the first OSError of `write` (torch.save turns it into a RuntimeError)."""

    def __init__(self, handle: Any) -> None:
        self.handle, self.error = handle, None

    def write(self, data: Any) -> int:
        try:
            return self.handle.write(data)
        except OSError as exc:
            self.error = self.error or exc
            raise

    def flush(self) -> None:
        self.handle.flush()


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    import torch

    def write(handle: Any) -> None:
        recorder = _WriteRecorder(handle)
        try:
            torch.save(obj, recorder)
        except RuntimeError:
            if recorder.error is not None:  # disk full etc.: report the OS error, not torch's "unexpected pos"
                raise recorder.error from None
            raise

    return _atomic_write(path, write, "wb")


def check_writable_dir(path: str | os.PathLike) -> Path:
    """Create `path` if needed and check that a file can be created in it, raising UserError otherwise.

    The check writes and removes a probe file: `os.access` says yes to root on a folder without write permission
    and cannot see every read-only mount.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"output folder {path} exists and is not a folder; choose another path")
    watch_output(path)  # inside a CLI: the folder is put back as it was if the command fails
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create output folder {path}: {exc.strerror or exc}; choose another path") from exc
    try:
        fd, probe = tempfile.mkstemp(prefix=".write_test.", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise UserError(f"output folder {path} is not writable ({exc.strerror or exc}); choose another folder") from exc
    return path


def check_output_outside(
    output: str | os.PathLike, folder: str | os.PathLike, flag: str, what: str = "the dataset folder"
) -> None:
    """UserError when the output folder is `folder` or inside it (a run never writes into its input data)."""
    out, root = Path(output).resolve(), Path(folder).resolve()
    if out == root or root in out.parents:
        raise UserError(f"{flag} {output} is inside {what} {folder}; choose a folder outside it")



class OutputGuard:
    """Puts output folders back as they were when a command fails on bad input (nothing written on failure).

    `watch(folder)` (called by `check_writable_dir` inside a `cli_entry` command, before the folder is created)
    remembers whether the folder existed and, if so, every file in it, hard-linked into a hidden backup folder
    inside it (no copy: atomic writes replace a file by a new inode, so the link keeps the old bytes). `rollback()`
    deletes what the command created (files, folders, a folder that did not exist) and restores replaced or deleted
    files; `commit()` drops the backups. A file rewritten in place (not atomically) cannot be restored this way:
    every writer here is atomic (`atomic_write_*`).
    """

    BACKUP_PREFIX = ".fsad-rollback-"

    def __init__(self) -> None:
        self.folders: list[tuple[Path, Path | None, dict, set, Path | None]] = []

    def watch(self, folder: str | os.PathLike) -> None:
        folder = Path(folder).absolute()
        if any(folder == f or f in folder.parents for f, *_ in self.folders):
            return
        created = folder
        while not created.parent.exists() and created.parent != created:  # mkdir(parents=True) creates these too
            created = created.parent
        if not folder.exists():
            self.folders.append((folder, created, {}, set(), None))
            return
        files, dirs, backup = {}, set(), None
        try:
            backup = Path(tempfile.mkdtemp(prefix=self.BACKUP_PREFIX, dir=folder))
        except OSError:  # a read-only folder: nothing can be written into it, so nothing needs undoing
            self.folders.append((folder, None, {}, set(), None))
            return
        for index, path in enumerate(p for p in sorted(folder.rglob("*")) if not self._is_backup(folder, p)):
            rel = path.relative_to(folder)
            if path.is_dir() and not path.is_symlink():
                dirs.add(rel)
                continue
            stat = path.lstat()
            saved = backup / str(index)
            try:
                os.link(path, saved, follow_symlinks=False)
            except OSError:
                saved = None
            files[rel] = ((stat.st_ino, stat.st_size, stat.st_mtime_ns), saved)
        self.folders.append((folder, None, files, dirs, backup))

    @classmethod
    def _is_backup(cls, folder: Path, path: Path) -> bool:
        return any(part.startswith(cls.BACKUP_PREFIX) for part in path.relative_to(folder).parts)

    def rollback(self) -> None:
        import shutil

        for folder, created, files, dirs, backup in reversed(self.folders):
            if created is not None:
                shutil.rmtree(created, ignore_errors=True)
                continue
            if not folder.exists():
                continue
            for path in sorted(folder.rglob("*"), key=lambda p: len(p.parts), reverse=True):
                rel = path.relative_to(folder)
                if self._is_backup(folder, path):  # ours, or another process's (torchrun ranks) in flight
                    continue
                if path.is_dir() and not path.is_symlink():
                    if rel not in dirs:
                        shutil.rmtree(path, ignore_errors=True)
                elif rel not in files:
                    path.unlink(missing_ok=True)
            for rel, (stamp, saved) in files.items():
                path = folder / rel
                now = path.lstat() if path.exists() or path.is_symlink() else None
                if saved is not None and (now is None or (now.st_ino, now.st_size, now.st_mtime_ns) != stamp):
                    path.parent.mkdir(parents=True, exist_ok=True)
                    os.replace(saved, path)
            if backup is not None:
                shutil.rmtree(backup, ignore_errors=True)
        self.folders = []

    def commit(self) -> None:
        import shutil

        for _, _, _, _, backup in self.folders:
            if backup is not None:
                shutil.rmtree(backup, ignore_errors=True)
        self.folders = []


_GUARDS: list[OutputGuard] = []  # one per running cli_entry command (nested commands nest)


def watch_output(folder: str | os.PathLike) -> None:
    """Register an output folder with the running command's OutputGuard (no-op outside a `cli_entry` command)."""
    if _GUARDS:
        _GUARDS[-1].watch(folder)


def _one_line(exc: UserError) -> str:
    """The message on one line. A DataLoader worker re-raises a UserError with the worker's traceback in the text
    ("Caught UserError in DataLoader worker process 0. Original Traceback ..."): keep only the original message."""
    text = str(exc)
    if "Original Traceback" in text:
        last = text.strip().splitlines()[-1]
        text = re.sub(r"^[\w.]*UserError: ", "", last)
    return " ".join(text.split())


def cli_entry(main: Callable[..., int | None]) -> Callable[..., int]:
    """Decorate a CLI `main`: user errors become one line on stderr and exit code 2, no traceback, and the output
    folders the command registered (`check_writable_dir`) are put back as they were (`OutputGuard`)."""

    @functools.wraps(main)
    def wrapper(*args: Any, **kwargs: Any) -> int:
        guard = OutputGuard()
        _GUARDS.append(guard)
        try:
            code = main(*args, **kwargs)
        except UserError as exc:
            guard.rollback()
            print(f"error: {_one_line(exc)}", file=sys.stderr)
            return EXIT_BAD_INPUT
        except KeyboardInterrupt:  # kept: an interrupted run's records are what --resume continues from
            print("error: interrupted", file=sys.stderr)
            return 130
        except OSError as exc:  # disk full, permissions, ... named with the file involved
            guard.rollback()
            where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
            print(f"error: {exc.strerror or exc}{where}", file=sys.stderr)
            return EXIT_BAD_INPUT
        finally:
            _GUARDS.remove(guard)
            guard.commit()  # after a rollback: nothing left to drop
        return int(code or 0)

    return wrapper
