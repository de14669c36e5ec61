"""What the engine hands its observers: one record per evaluated class, one per predict run.

An observer is any callable taking the record; the class loop (`engine.loop.evaluate`) calls each observer once per
class after its metrics, the predict run (`engine.predict_run.run_cli`) once per run after scoring. Observers
write reports, panels, exports; they never change what is scored. The records are defined once, in
`report.records` (a leaf module: numpy only), and re-exported here.
"""

from __future__ import annotations

from collections.abc import Callable

from report.records import ClassRecords, PredictRecords

__all__ = ["ClassObserver", "ClassRecords", "PredictObserver", "PredictRecords"]

ClassObserver = Callable[[ClassRecords], None]
PredictObserver = Callable[[PredictRecords], None]
