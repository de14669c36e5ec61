"""report.html of a predict run: the threshold and how it was derived, the score histogram, and every image as a
thumbnail with its heat map, score and decision, sorted by score (most anomalous first)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from report import images as im
from report.page import esc, settings_table, write_page
from report.plots import predict_figure
from report.records import PredictRecords

PREDICT_THUMB = 128
REFERENCE_THUMB = 96


def threshold_text(info: dict, threshold: float | None) -> str:
    """How the threshold was derived, in words (from threshold.json's fields)."""
    if threshold is None:
        return "no threshold: images are ranked by score only"
    rule, loo = info.get("rule"), info.get("loo_scores") or []
    if rule == "user":
        how = "given on the command line (--threshold)"
    elif rule == "max":
        how = f"the largest of the {len(loo)} leave-one-out reference scores x (1 + {info.get('margin')})"
    elif rule == "meanstd":
        how = f"mean + {info.get('z')} x std of the {len(loo)} leave-one-out reference scores"
    else:
        how = f"rule {rule}"
    return f"threshold {threshold:.4g}: {how}; a score above it is anomalous"


def _card(path: str, score: float, decision: str, anomaly_map, scale: tuple[float, float]) -> str:
    image = im.read_rgb(path, max_side=PREDICT_THUMB)
    name = "/".join(Path(path).parts[-2:])  # the folder too: good/005.png and hole/005.png are two images
    if image is None or anomaly_map is None:  # unreadable then, or moved since: one grey tile
        tags = im.img_tag(im.encode(im.placeholder((PREDICT_THUMB, PREDICT_THUMB))), f"unreadable {name}")
    else:
        heat = im.overlay(image, im.colorize(im.resize_map(anomaly_map, image.shape[:2]), *scale))
        tags = im.img_tag(im.encode(image), f"image {name}") + im.img_tag(im.encode(heat), f"heat map {name}")
    css = "bad" if decision == "anomalous" else "ok" if decision == "normal" else "muted"
    score_text = "-" if not np.isfinite(score) else f"{score:.4g}"
    caption = f'{esc(name)} &middot; score <b>{score_text}</b> &middot; <span class="{css}">{esc(decision)}</span>'
    return f'<figure class="ex">{tags}<figcaption>{caption}</figcaption></figure>'


def write_predict_report(
    out_dir: str | Path,
    records: PredictRecords,
    *,
    max_images: int | None = None,
    color_range: tuple[float, float] | None = None,
    settings: dict | None = None,
) -> Path:
    """Write OUT/report.html (atomically) for a predict run.

    Args:
        max_images: show only the N highest-scoring images (default: every image).
        color_range: (vmin, vmax) of the heat maps (the panels' run-wide scale); default the maps' range.
        settings: extra key / value rows (method, options).
    """
    scores = np.asarray(records.pred_scores, dtype=np.float64)
    maps = [m for m in records.anomaly_maps if m is not None]
    if color_range is None:
        values = np.concatenate([np.asarray(m, np.float32).ravel() for m in maps]) if maps else np.zeros(1)
        color_range = (float(values.min()), float(np.quantile(values, 0.999)))
    order = sorted(range(len(scores)), key=lambda i: -scores[i] if np.isfinite(scores[i]) else np.inf)
    shown = order if max_images is None else order[:max_images]
    info = records.threshold_info
    counts = {d: records.decisions.count(d) for d in ("anomalous", "normal", "unreadable")}
    refs = info.get("references") or []
    ref_tags = []
    for ref in refs:
        image = im.read_rgb(ref, max_side=REFERENCE_THUMB)
        if image is not None:
            ref_tags.append(im.img_tag(im.encode(image), f"reference {Path(ref).name}"))
    readable = np.isfinite(scores)
    figure = predict_figure(scores[readable], [records.decisions[i] for i in np.flatnonzero(readable)],
                            records.threshold, list(info.get("loo_scores") or []))  # fmt: skip
    summary = {**(settings or {}), "images": len(scores), **counts,
               "threshold": records.threshold, "threshold rule": info.get("rule")}  # fmt: skip
    body = [
        "<h2>Summary</h2>",
        settings_table(summary),
        f"<p>{esc(threshold_text(info, records.threshold))}.</p>",
        f'<img class="plot" src="{figure}" alt="score histogram">',
        f"<h2>References ({len(refs)})</h2><div class=\"grid\">{''.join(ref_tags)}</div>",
        f"<h2>Images by score ({len(shown)} of {len(scores)} shown)</h2>",
        f'<p class="muted">image | heat map overlay (inferno, {color_range[0]:.3g} dark to {color_range[1]:.3g} '
        "bright, one scale for the run)</p>",
        '<div class="grid">'
        + "".join(_card(records.image_paths[i], scores[i], records.decisions[i], records.anomaly_maps[i], color_range)
                  for i in shown)
        + "</div>",
    ]  # fmt: skip
    return write_page(Path(out_dir) / "report.html", "fsad predict report", "\n".join(body))
