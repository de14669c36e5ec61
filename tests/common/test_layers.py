"""The bottom layer: importing every module of common/ loads nothing of data/, engine/, report/ or a method."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PROBE = """
import importlib, pkgutil, sys
import common
for module in pkgutil.iter_modules(common.__path__):
    importlib.import_module("common." + module.name)
above = {"data", "engine", "report", "export", "fdsl", "pcsnet", "baseline", "api"}
print(sorted({n.split(".")[0] for n in sys.modules} & above))
"""


def test_common_imports_nothing_above_it():
    done = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
