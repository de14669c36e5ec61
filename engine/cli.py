"""`fsad`: one command for every method (installed by `pip install -e .`; see pyproject.toml).

    fsad eval    --method knn|fdsl|pcsnet --dataset-root DIR --k-shot K --seed S --save-dir OUT [method flags]
    fsad predict --method knn|fdsl|pcsnet --reference good/ --images new/ --out OUT [method flags]
    fsad train   --method fdsl --dataset-root AUX --save-dir OUT [flags]
    fsad bench   --dataset-root DIR --methods knn --shots 1,4 --seeds 0 --out runs/bench
    fsad methods                  # the registry: names and what each is

Each subcommand hands the remaining flags to the command it stands for (`fsad eval --method knn ...` is
`python -m baseline.knn ...`), so flags, outputs and errors are those of the old spellings, which keep working.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable

from common.utils import UserError, cli_entry
from engine import registry

# name -> ("module:function" or "repo/relative/file.py:function", one-line help). A function takes argv and returns
# an exit code. To add a subcommand, add one line here (e.g. "export": ("export:main", "...")).
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "eval": ("engine.cli:eval_main", "few-shot evaluation of a method on a dataset -> results.json"),
    "predict": ("engine.cli:predict_main", "score your own images against a few good references"),
    "train": ("engine.cli:train_main", "train a method that has a separate training step (fdsl)"),
    "bench": ("scripts/benchmark.py:main", "accuracy / speed / memory table over methods, shots and seeds"),
    "methods": ("engine.cli:methods_main", "list the registered methods"),
    "export": ("export.cli:main", "export a method to ONNX (model.onnx + preprocess.json), checked against PyTorch"),
    "report": ("report.index:main", "HTML index page over run folders (each run's report.html is written by the run)"),
}


def load_target(target: str) -> Callable[[list[str]], int]:
    """The function a SUBCOMMANDS target names (a module path, or a file of the repository)."""
    where, _, function = target.rpartition(":")
    if where.endswith(".py"):
        path = registry.REPO / where
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return getattr(module, function)
    return registry.load(target, f"fsad subcommand {target}")


def _split_method(argv: list[str], command: str) -> tuple[registry.Method, list[str]]:
    """`--method NAME` (or `--method=NAME`) out of argv; the rest is the method command's."""
    rest, name = [], None
    items = iter(argv)
    for item in items:
        if item == "--method":
            name = next(items, None)
        elif item.startswith("--method="):
            name = item.split("=", 1)[1]
        else:
            rest.append(item)
    if name is None:
        if not rest or rest[0] in ("-h", "--help"):
            print(f"usage: fsad {command} --method {{{','.join(registry.METHODS)}}} [the method's flags]\n"
                  f"  fsad {command} --method NAME --help   lists the method's flags")  # fmt: skip
            return None, []
        raise UserError(f"fsad {command} needs --method NAME (one of {', '.join(registry.METHODS)})")
    return registry.get_method(name), rest


def _delegate(argv: list[str], command: str, attribute: str) -> int:
    method, rest = _split_method(argv, command)
    if method is None:
        return 0
    target = getattr(method, attribute)
    if target is None:
        raise UserError(f"method '{method.name}' has no separate {command} step (it trains inside fsad eval)")
    return int(registry.load(target, f"method '{method.name}' {command}")(rest) or 0)


def eval_main(argv: list[str]) -> int:
    return _delegate(argv, "eval", "eval")


def predict_main(argv: list[str]) -> int:
    return _delegate(argv, "predict", "predict")


def train_main(argv: list[str]) -> int:
    return _delegate(argv, "train", "train")


def methods_main(argv: list[str]) -> int:
    del argv
    for method in registry.METHODS.values():
        steps = "eval, predict" + (", train" if method.train else "")
        print(f"{method.name:8s} {method.summary} [{steps}]")
    return 0


def _usage() -> str:
    lines = ["usage: fsad COMMAND [flags]   (fsad COMMAND --help for its flags)", "", "commands:"]
    lines += [f"  {name:9s} {help_text}" for name, (_, help_text) in SUBCOMMANDS.items()]
    return "\n".join(lines)


@cli_entry
def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in SUBCOMMANDS:
        raise UserError(f"unknown command '{command}': use one of {', '.join(SUBCOMMANDS)}")
    return int(load_target(SUBCOMMANDS[command][0])(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
