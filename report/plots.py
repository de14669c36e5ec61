"""The report's plots, drawn with matplotlib's Agg backend (no display), returned as PNG data: URIs."""

from __future__ import annotations

import base64
import io

import matplotlib

matplotlib.use("Agg")  # before pyplot: headless, and never a GUI window from a run
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from report.curves import pr_points, roc_points  # noqa: E402

DPI = 80
PLOT_POINTS = 2000  # curve points drawn (a pixel curve has up to 200 000; more would not show and cost seconds)
COLORS = {"image": "#3b528b", "pixel": "#5ec962", "normal": "#3b528b", "anomalous": "#f98e09"}  # viridis/inferno


def _to_uri(fig) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _empty(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="0.4")


def thin(*arrays: np.ndarray, n: int = PLOT_POINTS) -> tuple[np.ndarray, ...]:
    """At most n evenly spaced points of aligned curve arrays, the first and last kept."""
    size = arrays[0].size
    if size <= n:
        return arrays
    keep = np.unique(np.linspace(0, size - 1, n).round().astype(int))
    return tuple(a[keep] for a in arrays)


def _curves(ax_roc, ax_pr, level: str, scores: np.ndarray, labels: np.ndarray) -> None:
    fpr, tpr = thin(*roc_points(scores, labels)[:2])
    precision, recall = thin(*pr_points(scores, labels)[:2])
    if fpr.size:
        ax_roc.plot(fpr, tpr, color=COLORS[level], lw=1.5, label=level)
    if precision.size:
        ax_pr.plot(np.r_[0.0, recall], np.r_[precision[0], precision], color=COLORS[level], lw=1.5, label=level)


def class_figure(image: tuple, pixel: tuple | None, threshold: float | None, threshold_label: str) -> str:
    """ROC and PR curves (image, and pixel level when given) and the score histogram of normals vs anomalies.

    Args:
        image: (scores (N,), labels (N,)) of the images.
        pixel: (scores (P,), labels (P,)) of a pixel sample, or None (no masks).
        threshold: a vertical line on the histogram, or None.
        threshold_label: its legend text (e.g. "F1-max threshold (oracle)").
    """
    fig, (ax_roc, ax_pr, ax_hist) = plt.subplots(1, 3, figsize=(11, 3.1))
    for level, pair in (("image", image), ("pixel", pixel)):
        if pair is not None:
            _curves(ax_roc, ax_pr, level, *pair)
    ax_roc.plot([0, 1], [0, 1], color="0.7", lw=0.8, ls=":")
    ax_roc.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC", xlim=(0, 1), ylim=(0, 1.02))
    ax_pr.set(xlabel="recall", ylabel="precision", title="precision-recall", xlim=(0, 1), ylim=(0, 1.02))
    for ax, where in ((ax_roc, "lower right"), (ax_pr, "lower left")):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc=where, fontsize=8)
        else:
            _empty(ax, "needs normal and anomalous images")
    scores, labels = (np.asarray(a) for a in image)
    _histogram(ax_hist, scores, labels.astype(bool), threshold, threshold_label)
    fig.subplots_adjust(left=0.06, right=0.99, bottom=0.16, top=0.91, wspace=0.28)  # fixed: tight_layout draws twice
    return _to_uri(fig)


def _histogram(ax, scores: np.ndarray, anomalous: np.ndarray, threshold: float | None, label: str) -> None:
    finite = scores[np.isfinite(scores)]
    if finite.size == 0:
        _empty(ax, "no scores")
        return
    lo, hi = float(finite.min()), float(finite.max())
    if threshold is not None and np.isfinite(threshold):
        lo, hi = min(lo, threshold), max(hi, threshold)
    bins = np.linspace(lo, hi if hi > lo else lo + 1e-6, 31)
    for name, keep in (("normal", ~anomalous), ("anomalous", anomalous)):
        values = scores[keep & np.isfinite(scores)]
        if values.size:
            ax.hist(values, bins=bins, alpha=0.6, color=COLORS[name], label=f"{name} ({values.size})")
    if threshold is not None and np.isfinite(threshold):
        ax.axvline(threshold, color="#b40426", lw=1.5, ls="--", label=label)
    ax.set(xlabel="image score", ylabel="images", title="score histogram")
    ax.legend(fontsize=8)


def predict_figure(scores: np.ndarray, decisions: list[str], threshold: float | None, loo: list[float]) -> str:
    """Histogram of the predicted scores by decision, the threshold and the references' leave-one-out scores."""
    fig, ax = plt.subplots(figsize=(7, 2.8))
    scores = np.asarray(scores, dtype=np.float64)
    anomalous = np.array([d == "anomalous" for d in decisions], dtype=bool)
    _histogram(ax, scores, anomalous, threshold, "threshold")
    if loo:
        ax.plot(loo, np.zeros(len(loo)), "|", color="k", ms=14, mew=1.5, label="references (leave-one-out)")
        ax.legend(fontsize=8)
    fig.subplots_adjust(left=0.09, right=0.98, bottom=0.17, top=0.9)
    return _to_uri(fig)
