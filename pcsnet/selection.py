"""`--select best-of-evals`: the original's model selection, kept apart from the honest last-epoch numbers.

The original tests after epochs 0, 10, 20, 30, 40 and reports, per metric, the best of those test passes
(docs/design/pcsnet.md section 5, bug 9.9). That picks on the test set, so it is transductive: results.json carries
it under its own key (`best_of_evals`, labelled so), beside the last-epoch numbers of the CONTRACT keys.
"""

from __future__ import annotations

import dataclasses

import torch

from common.evaluation import EvalConfig, evaluate
from common.results import METRIC_KEYS, mean_metrics
from pcsnet.model import PCSNet

NOTE = (
    "transductive: for each metric the best of the test passes after the listed epochs, chosen on the test set as "
    "the original code reports; the per_class/mean keys at the top level are the last epoch's"
)


class _Snapshot:
    """A Detector scoring with `model` through `detector.predict` (its setup is a no-op: the model is trained)."""

    def __init__(self, detector, model: PCSNet):
        self.detector, self.model = detector, model

    def setup(self, class_name: str, support_images: torch.Tensor) -> None:
        pass

    def predict(self, images: torch.Tensor):
        saved = self.detector.model
        self.detector.model = self.model
        try:
            return self.detector.predict(images)
        finally:
            self.detector.model = saved


class BestOfEvals:
    """The `on_eval` hook of `PCSNetDetector`: a full test pass of the class at each of the original's test points.

    Args:
        detector: the PCSNetDetector being trained (its predict is reused).
        eval_cfg: the run's evaluation settings (restricted to the class being trained, no panels, no records).
    """

    def __init__(self, detector, eval_cfg: EvalConfig):
        self.detector = detector
        self.eval_cfg = dataclasses.replace(eval_cfg, class_names=None, class_done=None, vis_dir=None, observers=())
        self.evals: dict[str, list[dict]] = {}

    def __call__(self, class_name: str, epoch: int, model: PCSNet) -> None:
        cfg = dataclasses.replace(self.eval_cfg, class_names=[class_name])
        results, _ = evaluate(_Snapshot(self.detector, model), cfg, progress=False)
        self.evals.setdefault(class_name, []).append({"epoch": int(epoch), "metrics": results[class_name].metrics})


def best_metrics(passes: list[dict]) -> dict:
    """Per metric, the largest value over the test passes (None when no pass has it)."""
    out = {}
    for key in METRIC_KEYS:
        values = [p["metrics"].get(key) for p in passes if p["metrics"].get(key) is not None]
        out[key] = max(values) if values else None
    return out


def results_block(evals: dict[str, list[dict]], classes: list[str]) -> dict:
    """The results.json `best_of_evals` entry: best per class, their class mean, and every pass."""
    per_class = {c: best_metrics(evals.get(c, [])) for c in classes}
    return {
        "transductive": True,
        "note": NOTE,
        "epochs": {c: [p["epoch"] for p in evals.get(c, [])] for c in classes},
        "per_class": per_class,
        "mean": mean_metrics(per_class),
        "passes": {c: evals.get(c, []) for c in classes},
    }
