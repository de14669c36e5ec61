"""report.html of an evaluation: settings, the per-class metric table, and per class the support images, ROC / PR
curves, the score histogram and the worst cases (image / ground truth / heat map / overlay) with their scores."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np

from report import images as im
from report.curves import f1_max_threshold, sample_pixels, select_examples
from report.page import esc, fmt_metric, settings_table, table, write_page
from report.plots import class_figure
from report.records import ClassRecords

DEFAULT_MAX_IMAGES = 6  # examples per group (worst normals, worst anomalies); correct ones: max(1, N // 3)
SUPPORT_THUMB = 96
METRIC_COLUMNS = (("I-AUROC", "image_auroc"), ("I-AP", "image_ap"), ("I-F1max", "image_f1_max"),
                  ("P-AUROC", "pixel_auroc"), ("P-AP", "pixel_ap"), ("P-F1max", "pixel_f1_max"),
                  ("AUPRO", "pixel_aupro"))  # fmt: skip
GROUPS = (
    ("worst_normals", "Highest-scoring normal images (false alarms first)"),
    ("worst_anomalies", "Lowest-scoring anomalous images (misses first)"),
    ("correct_anomalies", "Correct: highest-scoring anomalies"),
    ("correct_normals", "Correct: lowest-scoring normals"),
)
PANELS = ("image", "ground truth", "heat map", "overlay")


class RenderedClass(NamedTuple):
    """A class section already rendered (what the evaluation loop keeps, so no maps are held across classes)."""

    class_name: str
    html: str


def _example(records: ClassRecords, i: int, size: int, vmin: float, vmax: float) -> str:
    """One figure: the four panels of image i and its caption."""
    path = records.image_paths[i]
    image = im.read_rgb(path, max_side=4 * size)
    image = im.placeholder((size, size)) if image is None else im.resize_rgb(image, (size, size))
    heat_map = im.resize_map(records.anomaly_maps[i], (size, size))
    mask = None
    known = records.gt_masks is not None and (not records.gt_labels[i] or records.gt_masks[i].any())
    if known:  # an anomaly with an all-zero mask has no mask (a defect folder without ground truth)
        mask = im.resize_map(records.gt_masks[i].astype(np.float32), (size, size), nearest=True) > 0.5
    heat = im.colorize(heat_map, vmin, vmax)
    truth = (mask.astype(np.uint8) * 255) if mask is not None else np.full((size, size), 40, np.uint8)
    label = "anomalous" if records.gt_labels[i] else "normal"
    name = Path(path).name
    tags = [
        im.img_tag(im.encode(image), f"image {name}"),
        im.img_tag(im.encode(truth, "PNG"), f"ground truth {name}" + ("" if mask is not None else " (no mask)")),
        im.img_tag(im.encode(heat), f"heat map {name}"),
        im.img_tag(im.encode(im.overlay(image, heat, mask)), f"overlay {name}"),
    ]
    rel = "/".join(Path(path).parts[-3:])
    caption = f"{esc(rel)} &middot; {label} &middot; score <b>{records.pred_scores[i]:.4g}</b>"
    return f'<figure class="ex">{"".join(tags)}<figcaption>{caption}</figcaption></figure>'


def render_class_section(records: ClassRecords, max_images: int = DEFAULT_MAX_IMAGES, thumb: int = im.THUMB) -> str:
    """The HTML of one class: its metrics, curves, histogram and examples (images inline)."""
    labels = np.asarray(records.gt_labels).astype(bool)
    scores = np.asarray(records.pred_scores, dtype=np.float64)
    maps = np.asarray(records.anomaly_maps)
    pixel = None
    sample = maps.reshape(-1)[:: max(1, maps.size // 100_000)]  # heat-map colour scale of the class
    if records.gt_masks is not None and np.asarray(records.gt_masks).any():
        masks = np.asarray(records.gt_masks)
        # as the pixel metrics: normal images, and anomalies whose mask is known (an unknown one is all zero)
        keep = ~labels | masks.reshape(len(masks), -1).any(axis=1)
        pixel = sample_pixels(maps[keep], masks[keep])
    vmin = float(sample.min()) if sample.size else 0.0
    vmax = float(np.quantile(sample, 0.999)) if sample.size else 1.0
    threshold = f1_max_threshold(scores, labels)
    figure = class_figure((scores, labels), pixel, threshold, "F1-max threshold (oracle)")
    parts = [
        table([c for c, _ in METRIC_COLUMNS], [[fmt_metric(records.metrics.get(k)) for _, k in METRIC_COLUMNS]], 0),
        f'<img class="plot" src="{figure}" alt="ROC, PR and score histogram of {esc(records.class_name)}">',
        f'<p class="muted">{labels.size} test images ({int(labels.sum())} anomalous). Pixel curves from '
        f"{'a sample of ' + str(pixel[0].size) + ' pixels' if pixel is not None else 'no masks: image level only'}. "
        f"Heat maps: inferno, {vmin:.3g} (dark) to {vmax:.3g} (bright), one scale for the class; "
        "ground-truth outline in cyan on the overlay.</p>",
    ]
    heads = "".join(f'<span style="width:{thumb + 2}px">{p}</span>' for p in PANELS)
    selection = select_examples(labels, scores, max_images)
    for key, title in GROUPS:
        chosen = selection[key]
        if chosen:
            figures = "".join(_example(records, i, thumb, vmin, vmax) for i in chosen)
            anchor = f"c-{esc(records.class_name)}-{key}"
            parts.append(f'<h3 id="{anchor}">{esc(title)}</h3><div class="heads">{heads}</div>'
                         f'<div class="grid">{figures}</div>')  # fmt: skip
    return "\n".join(parts)


def _support_strip(results: dict, class_name: str) -> str:
    paths = results.get("support", {}).get(class_name, [])
    if not paths:
        return ""
    root = Path(results.get("dataset_root", "."))
    tags = []
    for rel in paths:
        image = im.read_rgb(root / rel, max_side=SUPPORT_THUMB)
        image = im.placeholder((SUPPORT_THUMB, SUPPORT_THUMB)) if image is None else image
        tags.append(im.img_tag(im.encode(image), f"support {rel}"))
    return f'<p>Support ({len(paths)} normal images):</p><div class="grid">{"".join(tags)}</div>'


def _settings(results: dict) -> dict:
    keys = ("method", "backbone", "image_size", "k_shot", "seed", "dataset_root", "win_mode")
    items = {key: results.get(key) for key in keys}
    timing = results.get("timing", {})
    items["test images"] = timing.get("n_images")
    items["seconds per image"] = timing.get("test_seconds_per_image") or timing.get("seconds_per_image")
    skip = {"per_class", "mean", "support", "timing", *keys}
    items.update({key: value for key, value in results.items() if key not in skip})
    return items


def write_report(
    save_dir: str | Path, results: dict, class_records: list, *, max_images: int = DEFAULT_MAX_IMAGES
) -> Path:
    """Write SAVE_DIR/report.html (atomically) for an evaluation whose results.json dict is `results`.

    Args:
        class_records: per class a `ClassRecords`, or a `RenderedClass` from `render_class_section`; classes of
            `results["per_class"]` without one (e.g. restored by `--resume`) get their metrics and support only.
        max_images: examples per group (`--report-images N`).
    """
    rendered = {}
    for item in class_records:
        body = item.html if isinstance(item, RenderedClass) else render_class_section(item, max_images)
        rendered[item.class_name] = body
    per_class = results.get("per_class", {})
    rows = [[f'<a href="#c-{esc(c)}">{esc(c)}</a>'] + [fmt_metric(m.get(k)) for _, k in METRIC_COLUMNS]
            for c, m in per_class.items()]  # fmt: skip
    rows.append(["<b>mean</b>"] + [fmt_metric(results.get("mean", {}).get(k)) for _, k in METRIC_COLUMNS])
    body = [
        '<div class="row"><div><h2>Metrics (%)</h2>',
        table(["class"] + [c for c, _ in METRIC_COLUMNS], rows),
        '<p class="muted">F1-max uses an oracle threshold (the best one on the test labels): not a deployable F1.</p>',
        "</div><div><h2>Settings</h2>",
        settings_table(_settings(results)),
        "</div></div>",
    ]
    for name in per_class:
        section = rendered.get(name, '<p class="muted">no examples recorded for this class (resumed run).</p>')
        body.append(f'<section id="c-{esc(name)}"><h2>{esc(name)}</h2>{_support_strip(results, name)}{section}'
                    "</section>")  # fmt: skip
    title = f"{results.get('method', 'run')} on {Path(str(results.get('dataset_root', ''))).name}"
    return write_page(Path(save_dir) / "report.html", f"fsad report: {title}", "\n".join(body))
