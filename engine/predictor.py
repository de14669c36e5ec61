"""The predictor: a set-up detector plus a threshold from normals only, and the image readers it needs.

Behind `fsad predict`, `python -m <method>.predict` and `api.build_detector`. The detector follows
`common.contract`; its maps are post-processed by `common.contract.post_process` with the detector's own spec, as in
the evaluation loop, so a predict map equals the eval map of the same image and support.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from common.contract import post_process, post_spec
from common.predict import (
    DEFAULT_CLASS_NAME,
    DEFAULT_MARGIN,
    DEFAULT_RULE,
    DEFAULT_Z,
    THRESHOLD_RULES,
    collect_images,
    resize_map,
    threshold_from_scores,
)
from common.utils import UserError
from data.dataset import preprocess_image, read_image


def try_read(path: str | os.PathLike) -> tuple[np.ndarray | None, str | None]:
    """Read an image as RGB uint8 `(H, W, 3)`; returns (image, None) or (None, reason) and never raises."""
    try:
        return read_image(path), None
    except UserError as exc:
        return None, str(exc)


def to_rgb_uint8(image: np.ndarray | str | os.PathLike) -> np.ndarray:
    """A path, grayscale `(H, W)`, RGB `(H, W, 3)` or RGBA `(H, W, 4)` uint8 array -> RGB uint8 `(H, W, 3)`."""
    if isinstance(image, (str, os.PathLike)):
        return read_image(image)
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise UserError(f"images must be uint8 arrays (or paths), got dtype {image.dtype}")
    if image.ndim == 2:
        return np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim == 3 and image.shape[2] in (3, 4):
        return np.ascontiguousarray(image[:, :, :3])
    raise UserError(f"images must be (H, W), (H, W, 3) or (H, W, 4) arrays, got shape {image.shape}")


def read_references(
    sources: str | os.PathLike | Sequence[Any],
) -> tuple[list[np.ndarray], list[str], list[tuple[str, str]]]:
    """References from a folder, files or arrays -> (images, names, unreadable (name, reason)).

    Raises:
        UserError: no reference can be read.
    """
    if isinstance(sources, np.ndarray):  # one image (H, W[, 3|4]) or a stack (k, H, W[, C])
        stack = sources.ndim == 4 or (sources.ndim == 3 and sources.shape[2] not in (3, 4))
        sources = list(sources) if stack else [sources]
    if isinstance(sources, (list, tuple)) and sources and all(isinstance(s, np.ndarray) for s in sources):
        images = [to_rgb_uint8(s) for s in sources]
        return images, [f"array[{i}]" for i in range(len(images))], []
    images, names, bad = [], [], []
    for path in collect_images(sources, "--reference"):
        image, error = try_read(path)
        if image is None:
            bad.append((str(path), error))
        else:
            images.append(image)
            names.append(str(path))
    if not images:
        raise UserError(f"none of the {len(bad)} reference images could be read (first: {bad[0][1]})")
    return images, names, bad


@dataclass
class LOOResult:
    scores: np.ndarray  # (k,) image score of reference i with a detector set up on the others
    map_max: np.ndarray  # (k,) maximum of that reference's post-processed map
    map_min: float  # minimum over the LOO maps: the floor of the colour scale
    pseudo: str | None  # "hflip" when k == 1 (the reference and its mirror image stand in for two references)


class Predictor:
    """A set-up detector plus a threshold: `predict(image) -> (score, anomaly_map at the image's size)`.

    Args:
        detector: a builder's result, following `common.contract`.
        references: RGB uint8 `(H, W, 3)` good images, any sizes.
        class_name: name passed to `detector.setup`.
        threshold: image-score threshold; None = estimated by LOO over the references with `rule`/`margin`/`z`.
            Given, the LOO is skipped (PCSNet: k fewer trainings).
        pixel_threshold: map threshold of the outline; None = `threshold` when the detector's score is the map
            maximum (kNN) or no LOO ran, else the same rule applied to the LOO map maxima.
        rule: "max" or "meanstd" (see `threshold_from_scores`).
        margin: margin of the "max" rule.
        z: z of the "meanstd" rule.
        device: where inputs go.
        batch_size: images per `detector.predict` call.
    """

    def __init__(
        self,
        detector: Any,
        references: Sequence[np.ndarray],
        class_name: str = DEFAULT_CLASS_NAME,
        threshold: float | None = None,
        pixel_threshold: float | None = None,
        rule: str = DEFAULT_RULE,
        margin: float = DEFAULT_MARGIN,
        z: float = DEFAULT_Z,
        device: torch.device | str = "cpu",
        batch_size: int = 8,
    ) -> None:
        if not references:
            raise UserError("at least one reference image is needed")
        if rule not in THRESHOLD_RULES:
            raise UserError(f"unknown threshold rule '{rule}': use one of {', '.join(THRESHOLD_RULES)}")
        self.detector, self.class_name = detector, class_name
        self.device, self.batch_size = torch.device(device), max(1, int(batch_size))
        self.image_size = int(detector.image_size)
        self.post = post_spec(detector)  # the same post-processing as the evaluation loop
        self.smooth_sigma = self.post.smooth_sigma
        self.k_shot, self.margin, self.z = len(references), margin, z
        self.rule = "user" if threshold is not None else rule
        self.score_is_map_max = True  # until the detector returns its own pred_score
        support = self.preprocess(list(references))
        self.loo = self._leave_one_out(support) if threshold is None else None
        self.threshold = (
            float(threshold) if self.loo is None else threshold_from_scores(self.loo.scores, rule, margin, z)
        )
        self.detector.setup(class_name, support)
        # colour-scale floor: the LOO maps, or (no LOO) the references' own maps under the final setup
        self.map_floor = self.loo.map_min if self.loo else float(self.predict_batch(list(references))[1].min())
        if pixel_threshold is not None:
            self.pixel_threshold = float(pixel_threshold)
        elif self.score_is_map_max or self.loo is None:
            self.pixel_threshold = self.threshold
        else:
            self.pixel_threshold = threshold_from_scores(self.loo.map_max, rule, margin, z)

    def preprocess(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """RGB uint8 images of any sizes -> `(B, 3, S, S)` normalised for the detector, on its device."""
        batch = [preprocess_image(image, self.image_size, self.detector.mean, self.detector.std) for image in images]
        return torch.stack(batch).to(self.device)

    @torch.inference_mode()
    def _forward(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`(B, 3, S, S)` -> scores `(B,)`, maps `(B, E, E)` post-processed as in evaluation (E: eval size), on CPU."""
        output = self.detector.predict(batch)
        if output[0] is not None:
            self.score_is_map_max = False
        pred_score, anomaly_map = post_process(output, self.post)
        return pred_score.float().cpu(), anomaly_map.float().cpu()

    def _leave_one_out(self, support: torch.Tensor) -> LOOResult:
        """Score each reference with the detector set up on the others; k == 1 uses the mirror image as a peer."""
        pseudo = None
        if len(support) == 1:
            support, pseudo = torch.cat([support, support.flip(-1)]), "hflip"
        scores, maxima, floor = [], [], float("inf")
        for i in range(len(support)):
            self.detector.setup(self.class_name, torch.cat([support[:i], support[i + 1 :]]))
            score, anomaly_map = self._forward(support[i : i + 1])
            scores.append(float(score[0]))
            maxima.append(float(anomaly_map.max()))
            floor = min(floor, float(anomaly_map.min()))
        return LOOResult(np.array(scores), np.array(maxima), floor, pseudo)

    def predict_batch(self, images: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """RGB uint8 images -> scores `(B,)` and maps `(B, E, E)` at the detector's eval size (float32 numpy)."""
        scores, maps = [], []
        for start in range(0, len(images), self.batch_size):
            score, anomaly_map = self._forward(self.preprocess(images[start : start + self.batch_size]))
            scores.append(score.numpy())
            maps.append(anomaly_map.numpy())
        return np.concatenate(scores), np.concatenate(maps)

    def predict(self, image: np.ndarray | str | os.PathLike) -> tuple[float, np.ndarray]:
        """One image (path or uint8 array, any size) -> (score, anomaly map float32 `(H, W)` at the image's size)."""
        rgb = to_rgb_uint8(image)
        scores, maps = self.predict_batch([rgb])
        return float(scores[0]), resize_map(maps[0], rgb.shape[:2])

    def decide(self, score: float) -> bool:
        """True when the score is above the threshold (anomalous)."""
        return bool(score > self.threshold)

    @property
    def color_range(self) -> tuple[float, float]:
        """A run-wide heat-map scale: blue at the LOO maps' floor, the pixel threshold mid-scale, red at twice it."""
        low = min(self.map_floor, self.pixel_threshold)
        return low, low + max(2.0 * (self.pixel_threshold - low), 1e-6)

    def threshold_info(self) -> dict:
        """What threshold.json records: rule, value, LOO scores."""
        return {
            "rule": self.rule, "margin": self.margin if self.rule == "max" else None,
            "z": self.z if self.rule == "meanstd" else None, "value": self.threshold,
            "pixel_threshold": self.pixel_threshold, "k_shot": self.k_shot,
            "pseudo_reference": self.loo.pseudo if self.loo else None,
            "loo_scores": self.loo.scores.tolist() if self.loo else [],
            "loo_map_max": self.loo.map_max.tolist() if self.loo else [],
            "score_is_map_max": self.score_is_map_max, "image_size": self.image_size,
        }  # fmt: skip
