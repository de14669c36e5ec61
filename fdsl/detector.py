"""The FDSL few-shot detector: per-class banks in `setup`, FD -> ASL (-> NAM) maps and LFE windows in `predict`.

It follows the detector contract of `common/contract.py`. Banks are built when a class starts and replaced at the next
class, so memory does not grow with the number of classes (the original kept every class's window bank).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from common.anomaly_map import upsample_map
from common.backbones import Backbone, BackboneOutput
from common.contract import DetectorOutput, ScoreFusion, require_setup
from common.memory_bank import greedy_coreset
from common.patch_knn import SupportKNN
from common.utils import UserError
from fdsl.calibration import LevelStats, leave_one_out, level_stats, logit, standardise
from fdsl.model import ASL_HIDDEN, FDSLHead, discrepancies, extract_levels, feature_discrepancy, flatten_tokens
from fdsl.windows import (
    WindowGeometry,
    check_encode_mode,
    cut_windows,
    encode_shared,
    encode_windows,
    shared_coverage,
    stitch_windows,
)

WIN_MODES = ("nan", "mul", "onlywin")


@dataclass
class DetectorOptions:
    """Test-time switches (names follow the original's flags; see fdsl/config.py for the CLI)."""

    win_mode: str = "nan"  # nan = no LFE, mul = blend, onlywin = window branch only
    win_weight: float = 0.5  # w: final = (1 - w) * main + w * windows (map and image score)
    use_nam: bool = True  # keep the NAM outputs instead of the raw ASL maps (original useConvRes)
    win_use_nam: bool = True  # NAM on the stitched window map (original winuseConvRes)
    # `zoomed` (ours, `shared` windows only): keep the window map at the zoomed grid instead of resizing every window
    # back to the main grid, so LFE adds resolution for small defects; `grid` (the original's geometry) resizes back
    win_resolution: str = "grid"
    use_img_idx: bool = False  # image feature index memory bank for the windows (original useimgidx)
    img_idx_match: str = "pooled"  # pooled = the original (all selected windows' tokens); own = its own window only
    map_size: int | None = None  # upsample the final map to this side here (None: the evaluator does it)
    map_align_corners: bool = False  # align_corners of that upsampling (the original: True)
    autocast: bool = False  # FD / ASL / NAM under fp16 autocast on CUDA (the original's test under amp.autocast)
    fd_weight: float = 0.0  # a: map = (1 - a) * ASL + a * mean_l(1 - max cos); 0 = the original code
    # `support` (ours): every level's FD map and ASL logit map are standardised with the normal spread measured on the
    # support leave-one-out (fdsl/calibration.py) before levels and maps are blended; `none` = raw maps (the paper)
    map_norm: str = "none"
    # `support`: the head's input deviation is divided by the support's per-channel normal RMS; must be the
    # checkpoint's (`fdsl.train --input-norm`), as `feature_pool`
    input_norm: str = "none"
    fd_match: str = "level"  # `joint` (ours): one nearest reference patch for all levels (fdsl.model.joint_discrepancy)
    signed: bool = False  # deviation f - n instead of |f - n| (original useAbs=0)
    # b (ours, needs map_norm `support`): final map = (1 - b) * FDSL's map + b * the kNN baseline's distance map
    # (common/patch_knn.py, from the same backbone pass) in units of its normal spread on the support; 0 = off
    knn_weight: float = 0.0
    # backbone levels of the kNN term (fdsl.test.resolve_knn_layers); () = FDSL's own. Levels FDSL does not use come
    # from the same forward (`Backbone.tap`); the term's map is on FDSL's grid, finer levels area-averaged down to it
    knn_layers: tuple[int, ...] = ()
    score_from_map: bool = False  # image score = max of the post-processed final map (None to the evaluator)
    feature_pool: int = 1  # local average pooling before FD; must be the checkpoint's (fdsl.model.extract_levels)
    chunk_size: int = 4096  # query rows per similarity matmul
    coreset: float = 1.0  # fraction of reference tokens kept per bank (greedy k-center); 1 = exact FD (the paper)
    encode_batch: int = 32  # window crops per backbone call
    window_batch_bytes: int = 256 * 2**20  # window tokens' features + ASL activations held at once (images per step)


def _level_mean(maps: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-level maps [(B, G, G)] -> map (B, G, G) = mean over levels, score (B,) = mean of each level's maximum."""
    stacked = torch.stack(maps)  # (L, B, G, G)
    return stacked.mean(0), stacked.flatten(2).amax(2).mean(0)


def _combine(
    asl: list[torch.Tensor] | None, fd: list[torch.Tensor], fd_weight: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Layer-mean map and image score of one branch.

    Args:
        asl: per level P(anomalous) maps (B, G, G); None when fd_weight is 1 (the head is not run).
        fd: per level training-free maps 1 - max cos (B, G, G).
        fd_weight: a in (1 - a) * ASL + a * FD.

    Returns:
        map (B, G, G) = mean over levels; score (B,) = mean over levels of each level map's maximum (original).
    """
    if asl is None:
        return _level_mean(fd)
    asl_map, asl_score = _level_mean(asl)
    if fd_weight == 0:
        return asl_map, asl_score
    fd_map, fd_score = _level_mean(fd)
    return (1 - fd_weight) * asl_map + fd_weight * fd_map, (1 - fd_weight) * asl_score + fd_weight * fd_score


def select_windows(query_keys: torch.Tensor, ref_keys: torch.Tensor) -> torch.Tensor:
    """Image feature index: each query window's reference window = argmax of the key cosine similarity.

    query_keys (N, D) and ref_keys (R, D) are L2-normalised pooled embeddings -> (N,) indices into the R windows.
    """
    return (query_keys.to(ref_keys.dtype) @ ref_keys.T).argmax(dim=1)


def pooled_indexed_discrepancy(
    query: torch.Tensor, bank: torch.Tensor, choice: torch.Tensor, n_windows: int, signed: bool, chunk_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """FD for windows with the image feature index bank, as the original: per query image, the tokens of the
    reference windows its n_windows query windows selected are pooled (duplicates kept), and every query-window
    token is matched against that whole reduced pool.

    Args:
        query: (B * n_windows, C, t, t) normalised query-window features, image-major.
        bank: (R, T, C) normalised reference-window tokens.
        choice: (B * n_windows,) selected reference window of each query window (`select_windows`).

    Returns:
        deviation (B * n_windows, C, t, t) and max_cos (B * n_windows, t, t).
    """
    devs, sims = [], []
    for start in range(0, query.shape[0], n_windows):  # one query image at a time: its own pool
        pool = bank.index_select(0, choice[start : start + n_windows]).flatten(0, 1)  # (n_windows * T, C)
        dev, max_cos = feature_discrepancy(query[start : start + n_windows], pool, signed, chunk_size)
        devs.append(dev)
        sims.append(max_cos)
    return torch.cat(devs), torch.cat(sims)


def indexed_discrepancy(
    query: torch.Tensor, bank: torch.Tensor, choice: torch.Tensor, signed: bool, chunk: int = 64
) -> tuple[torch.Tensor, torch.Tensor]:
    """FD for windows with the image feature index bank, our variant (`--img-idx-match own`): each query window
    searches only the one reference window it selected.

    Args:
        query: (N, C, t, t) normalised query-window features.
        bank: (R, T, C) normalised reference-window tokens, T = t * t.
        choice: (N,) index of the reference window picked for each query window (most similar pooled key).
        signed: keep the sign of f - n.
        chunk: query windows per batched matmul.

    Returns:
        deviation (N, C, t, t) and max_cos (N, t, t).
    """
    n, c, t, _ = query.shape
    tokens = query.flatten(2).transpose(1, 2)  # (N, T, C)
    devs, sims = [], []
    for start in range(0, n, chunk):
        q = tokens[start : start + chunk]
        ref = bank.index_select(0, choice[start : start + chunk])  # (n, T, C)
        sim = torch.bmm(q.to(ref.dtype), ref.transpose(1, 2))  # (n, T, T)
        best, idx = sim.max(dim=2)
        normal = torch.gather(ref, 1, idx[..., None].expand(-1, -1, c)).float()
        devs.append(q - normal)
        sims.append(best.float())
    dev = torch.cat(devs)
    dev = dev if signed else dev.abs()
    return dev.transpose(1, 2).reshape(n, c, t, t), torch.cat(sims).reshape(n, t, t)


class FDSLDetector:
    """FD + ASL (+ NAM) on the main image and, optionally, on LFE windows.

    Args:
        backbone: frozen feature extractor (any `common.backbones` backbone).
        head: trained FDSLHead whose level widths match `backbone.feature_info`.
        opts: test-time options.
        geometry: window geometry (required unless win_mode is `nan`).
        window_support_fn: class name -> (k, 3, S, S) images for the window bank. None = the support of
            `setup` (one draw for both banks); the `--legacy-second-draw` flag passes the original's second draw.
        image_size: input side S (default: the backbone's).
        smooth_sigma, eval_size, score_fusion: the post-processing spec (common/contract.py): gaussian sigma on
            the map upsampled to `eval_size` (FDSL: 240, sigma 0), and the per-class image-score fusion.
    """

    def __init__(
        self,
        backbone: Backbone,
        head: FDSLHead,
        opts: DetectorOptions,
        geometry: WindowGeometry | None = None,
        window_support_fn: Callable[[str], torch.Tensor] | None = None,
        image_size: int | None = None,
        smooth_sigma: float = 0.0,
        eval_size: int | None = None,
        score_fusion: ScoreFusion | None = None,
    ) -> None:
        if opts.win_mode not in WIN_MODES:
            raise ValueError(f"win_mode must be one of {WIN_MODES}, got {opts.win_mode!r}")
        if opts.win_mode != "nan" and geometry is None:
            raise ValueError("a window geometry is needed when win_mode is not 'nan'")
        if geometry is not None:
            check_encode_mode(geometry.encode, backbone.kind)
        self.backbone, self.head, self.opts, self.geometry = backbone, head.eval(), opts, geometry
        self.window_support_fn = window_support_fn
        self.mean, self.std = backbone.mean, backbone.std  # input spec (common/contract.py)
        self.main_size = int(image_size or backbone.default_image_size)  # S: the main branch's input side
        # Input spec: S, or zoom x S with zoomed shared windows, so the windows read the zoomed pixels from the image
        # file (a small defect keeps its detail) instead of upsampling the S x S input; the main branch resizes down.
        self.image_size = geometry.shared_px if self.reads_zoomed_input else self.main_size
        self.smooth_sigma, self.eval_size, self.score_fusion = float(smooth_sigma), eval_size, score_fusion
        device = next(head.parameters()).device
        self.bank_dtype = torch.float16 if device.type == "cuda" else torch.float32  # fp16 banks on GPU
        self.bank: list[torch.Tensor] = []
        self.win_bank: list[torch.Tensor] = []
        self.win_keys: torch.Tensor | None = None
        self.stats: list[LevelStats] = []  # support calibration of the main levels (fdsl/calibration.py)
        self.win_stats: list[LevelStats] = []  # ... and of the zoomed window levels
        self.memory: dict[str, int] = {}
        self.knn: SupportKNN | None = None  # the kNN term's bank and normal spread (knn_weight > 0)
        if not 0.0 <= opts.knn_weight <= 1.0:
            raise ValueError(f"--knn-weight must be in [0, 1] (got {opts.knn_weight:g})")
        if opts.knn_weight > 0 and opts.map_norm != "support":
            raise ValueError(f"--knn-weight {opts.knn_weight:g} needs --map-norm support (it blends z-scores)")
        if opts.knn_weight > 0 and opts.knn_layers:
            own = tuple(getattr(backbone, "layers", ()))
            try:
                backbone.tap([level for level in opts.knn_layers if level not in own])
            except UserError as exc:
                raise ValueError(f"--knn-layers: {exc}") from exc
        if (self.calibrated or opts.fd_match == "joint") and self.uses_windows and not self.shares_window_tokens:
            raise ValueError("support calibration (--map-norm support, or a head trained with --input-norm support) "
                             "and --fd-match joint with LFE windows need --win-encode shared and --use-img-idx 0; for "
                             "other windows use --map-norm none --fd-match level")  # fmt: skip

    @property
    def calibrated(self) -> bool:
        """Whether setup measures the support's normal statistics (map standardisation or head input scaling)."""
        return self.opts.map_norm == "support" or self.opts.input_norm == "support"

    def _calibrate(self, support: list[torch.Tensor], window: bool = False) -> list[LevelStats]:
        """Per-level normal statistics of support features (k, C, G, G) by leave-one-out (fdsl/calibration.py)."""
        stats = []
        loo = leave_one_out(support, self.opts.signed, self.opts.chunk_size, match=self.opts.fd_match)
        for level, (dev, fd) in enumerate(loo):
            st = level_stats(dev, fd)
            if self.opts.map_norm == "support" and self.opts.fd_weight < 1:  # the ASL logits' normal spread too
                asl = self._asl_level(level, self._scaled(dev, st), window)
                st.asl_mean, st.asl_std = float(asl.mean()), float(asl.std(unbiased=False).clamp_min(1e-6))
            stats.append(st)
        return stats

    def _scaled(self, deviation: torch.Tensor, st: LevelStats | None) -> torch.Tensor:
        """The head's input: the deviation, divided by the support's channel RMS when the head was trained so."""
        if self.opts.input_norm != "support" or st is None:
            return deviation
        return deviation / st.channel_scale.to(deviation.device)[None, :, None, None]

    def _asl_level(self, level: int, deviation: torch.Tensor, window: bool) -> torch.Tensor:
        """ASL (-> NAM) of one level as `map_norm: support` blends it: logit of P(anomalous), (B, G, G).

        The main branch uses the NAM outputs when `use_nam`; windows the per-token ASL map, refined by NAM when
        `win_use_nam` (the stitched map is not refined again under support calibration).
        """
        if not window:
            return logit(self.head.level_score(level, deviation, self.opts.use_nam))
        prob = self.head.asl[level](deviation)[:, 1]
        if self.opts.win_use_nam and self.opts.use_nam:
            prob = self.head.refine(prob)
        return logit(prob)

    @property
    def uses_windows(self) -> bool:
        return self.opts.win_mode != "nan"

    @property
    def shares_window_tokens(self) -> bool:
        """`shared` windows without the index bank: FD runs once per zoomed token, windows are cut afterwards.

        A token of the zoomed map appears in every window covering it, with the same features, so the pooled window
        bank holds each covered reference token ~(win / stride)^2 times. Deduplicating it, and matching every
        query token once instead of once per covering window, gives the same nearest neighbours (identical
        vectors), deviations and per-token ASL scores, so the same window maps, for ~(win / stride)^2 less work.
        """
        return self.uses_windows and self.geometry.encode == "shared" and not self.opts.use_img_idx

    @property
    def reads_zoomed_input(self) -> bool:
        """`--win-resolution zoomed` with shared windows: inputs arrive at geometry.shared_px (see __init__)."""
        return self.shares_window_tokens and self.opts.win_resolution == "zoomed"

    def _main_input(self, images: torch.Tensor) -> torch.Tensor:
        """Zoomed inputs (`reads_zoomed_input`) downsampled (antialiased) to the main side S; others unchanged."""
        if not self.reads_zoomed_input or images.shape[-1] == self.main_size:
            return images
        size = (self.main_size, self.main_size)
        return F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=True)

    def encode(self, images: torch.Tensor) -> list[torch.Tensor]:
        """(B, 3, S, S) -> per-level normalised features (B, C_l, G, G) on the finest level's grid."""
        return self._encode(images)[0]

    def _encode(self, images: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """`encode`, and the raw backbone levels too when the kNN term needs them (else [])."""
        features, raw = [], []
        for start in range(0, images.shape[0], self.opts.encode_batch):
            out = self.backbone(images[start : start + self.opts.encode_batch])
            features.append(extract_levels(out.features, self.opts.feature_pool))
            if self.opts.knn_weight > 0:
                raw.append(self._knn_levels(out))
        levels = [torch.cat([f[i] for f in features]) for i in range(len(features[0]))]
        return levels, [torch.cat([f[i] for f in raw]) for i in range(len(raw[0]))] if raw else []

    def _knn_levels(self, out: BackboneOutput) -> list[torch.Tensor]:
        """The kNN term's levels of one backbone pass: FDSL's own, or `knn_layers` (own or tapped)."""
        if not self.opts.knn_layers:
            return out.features
        own = list(self.backbone.layers)
        return [out.features[own.index(lv)] if lv in own else out.extra[lv] for lv in self.opts.knn_layers]

    @torch.inference_mode()
    def setup(self, class_name: str, support_images: torch.Tensor) -> None:
        """Build this class's banks from the k support images (k, 3, S, S); the previous class's are dropped."""
        self.bank, self.win_bank, self.win_keys = [], [], None  # free the previous class first
        self.knn = None
        support, raw = self._encode(self._main_input(support_images))
        self.bank = self._reduce([flatten_tokens(f) for f in support])  # M_l: (k*G*G, C)
        if raw:  # on FDSL's grid
            self.knn = SupportKNN(size=tuple(support[0].shape[-2:])).fit(raw)
        self.stats = self._calibrate(support) if self.calibrated else []
        self.win_stats = []
        if self.uses_windows:
            images = support_images if self.window_support_fn is None else self.window_support_fn(class_name)
            self._setup_windows(images.to(support_images.device))
        self.memory = self._memory_report()

    def _setup_windows(self, images: torch.Tensor) -> None:
        """The window bank (and index keys) of the reference images (k, 3, S, S)."""
        geom, batch, pool = self.geometry, self.opts.encode_batch, self.opts.feature_pool
        if self.shares_window_tokens:  # each covered token of the zoomed references once (see the property)
            cover = shared_coverage(geom, images.device)
            maps = encode_shared(self.backbone, images, geom, batch, pool)
            self.win_bank = self._reduce([flatten_tokens(m[:, :, cover][:, :, :, cover]) for m in maps])
            if self.calibrated:  # the zoomed tokens' own normal statistics
                self.win_stats = self._calibrate([m[:, :, cover][:, :, :, cover] for m in maps], window=True)
            return
        feats, keys = encode_windows(self.backbone, images, geom, batch, pool)
        if self.opts.use_img_idx:  # keep windows separate: (k*nW, T, C), searched one window at a time
            self.win_bank = [f.flatten(2).transpose(1, 2).to(self.bank_dtype).contiguous() for f in feats]
            self.win_keys = keys.to(self.bank_dtype)
        else:  # all windows of all references pooled (original usewinmem=1)
            self.win_bank = self._reduce([flatten_tokens(f) for f in feats])

    def _reduce(self, levels: list[torch.Tensor]) -> list[torch.Tensor]:
        """Banks of (M, C_l) reference tokens per level: all of them, or a greedy coreset with `opts.coreset` < 1
        (per level; with `fd_match: joint` one coreset of the concatenated levels, so rows stay aligned)."""
        if self.opts.coreset < 1.0:
            if self.opts.fd_match == "joint":
                keep = greedy_coreset(torch.cat(levels, 1), self.opts.coreset)
                levels = [t[keep] for t in levels]
            else:
                levels = [t[greedy_coreset(t, self.opts.coreset)] for t in levels]
        return [t.to(self.bank_dtype) for t in levels]

    def _memory_report(self) -> dict[str, int]:
        """Stored bank bytes and the bytes one query window searches (what the index bank reduces)."""

        def nbytes(tensors):
            return sum(t.numel() * t.element_size() for t in tensors)

        report = {"main_bank_bytes": nbytes(self.bank)}
        if self.knn is not None:
            report["knn_bank_bytes"] = self.knn.bank.nbytes
        if self.uses_windows:
            report["window_bank_bytes"] = nbytes(self.win_bank)
            report["window_key_bytes"] = nbytes([self.win_keys]) if self.win_keys is not None else 0
            per_window = nbytes(self.win_bank)
            if self.opts.use_img_idx:  # own: one reference window; pooled: the n_windows selected ones
                own = nbytes([b[0] for b in self.win_bank])
                per_window = own * (self.geometry.n_windows if self.opts.img_idx_match == "pooled" else 1)
            report["window_searched_bytes"] = per_window
        return report

    def _main_branch(self, images: torch.Tensor, levels: list[torch.Tensor] | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """FD -> ASL (-> NAM) on the whole image (or its `encode`d levels): map (B, G, G), score (B,)."""
        deviations, fd_maps = [], []
        levels = self.encode(self._main_input(images)) if levels is None else levels
        results = discrepancies(levels, self.bank, self.opts.fd_match, self.opts.signed, self.opts.chunk_size)
        for level, (dev, max_cos) in enumerate(results):
            deviations.append(self._scaled(dev, self.stats[level] if self.stats else None))
            fd_maps.append(1.0 - max_cos)
        if self.opts.map_norm == "support":
            return self._calibrated_maps(deviations, fd_maps, self.stats, window=False)
        if self.opts.fd_weight == 1:  # the ASL term has weight 0: skip the head
            return _combine(None, fd_maps, 1.0)
        asl = self.head.score_maps(deviations, self.opts.use_nam)
        return _combine(asl, fd_maps, self.opts.fd_weight)

    def _calibrated_maps(
        self, deviations: list[torch.Tensor], fd_maps: list[torch.Tensor], stats: list[LevelStats], window: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`map_norm: support`: per level z-scores of the FD map and the ASL logits (normal support = 0 mean, unit
        spread), blended as (1 - a) * ASL + a * FD and averaged over levels: map (B, G, G), score (B,)."""
        fd_z = [standardise(fd, st.fd_mean, st.fd_std) for fd, st in zip(fd_maps, stats)]
        if self.opts.fd_weight == 1:
            return _combine(None, fd_z, 1.0)
        asl_z = [
            standardise(self._asl_level(level, dev, window), st.asl_mean, st.asl_std)
            for level, (dev, st) in enumerate(zip(deviations, stats))
        ]
        return _combine(asl_z, fd_z, self.opts.fd_weight)

    def _images_per_window_step(self) -> int:
        """Images whose window tokens fit `window_batch_bytes` (1 for ViT-L: 169 windows of 169 tokens).

        Per token: its features on every level plus the widest ASL activation, float32.
        """
        geom = self.geometry
        per_token = 4 * (sum(info.channels for info in self.backbone.feature_info) + ASL_HIDDEN[0])
        tokens = geom.shared_grid**2 if self.shares_window_tokens else geom.n_windows * geom.tokens**2
        return max(1, self.opts.window_batch_bytes // (tokens * per_token))

    def _window_branch(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """LFE on (B, 3, S, S): window FD -> ASL -> stitch (-> NAM). map (B, G, G), score (B,)."""
        geom = self.geometry
        if self.shares_window_tokens:  # FD and ASL per zoomed token, then the windows are cut (see the property)
            maps = encode_shared(self.backbone, images, geom, self.opts.encode_batch, self.opts.feature_pool)
            results = discrepancies(maps, self.win_bank, self.opts.fd_match, self.opts.signed, self.opts.chunk_size)
            if self.calibrated:
                results = [(self._scaled(dev, st), max_cos) for (dev, max_cos), st in zip(results, self.win_stats)]
            if self.opts.map_norm == "support":  # z-scores per zoomed token, then cut and stitched (affine: exact)
                fd = [1.0 - max_cos for _, max_cos in results]
                z_map, z_score = self._calibrated_maps([d for d, _ in results], fd, self.win_stats, window=True)
                if self.opts.win_resolution == "zoomed":
                    return z_map, z_score
                stitched = stitch_windows(self._to_win(cut_windows(z_map[:, None], geom)[:, 0]), geom)
                return stitched, stitched.flatten(1).amax(1)
            probs = [self.head.asl[level](dev)[:, 1] for level, (dev, _) in enumerate(results)]
            if self.opts.win_resolution == "zoomed":
                return self._zoomed_window_maps(probs, [1.0 - max_cos for _, max_cos in results])
            window_probs = [cut_windows(p[:, None], geom)[:, 0] for p in probs]
            window_cos = [cut_windows(max_cos[:, None], geom)[:, 0] for _, max_cos in results]
        else:
            feats, keys = encode_windows(self.backbone, images, geom, self.opts.encode_batch, self.opts.feature_pool)
            choice = None
            if self.opts.use_img_idx:  # each query window -> its most similar reference window (pooled key)
                choice = select_windows(keys, self.win_keys)
            window_probs, window_cos = [], []
            for level, (feat, bank) in enumerate(zip(feats, self.win_bank)):
                if choice is None:
                    dev, max_cos = feature_discrepancy(feat, bank, self.opts.signed, self.opts.chunk_size)
                elif self.opts.img_idx_match == "pooled":
                    dev, max_cos = pooled_indexed_discrepancy(
                        feat, bank, choice, geom.n_windows, self.opts.signed, self.opts.chunk_size
                    )
                else:
                    dev, max_cos = indexed_discrepancy(feat, bank, choice, self.opts.signed)
                window_probs.append(self.head.asl[level](dev)[:, 1])  # raw window ASL map (B*nW, t, t)
                window_cos.append(max_cos)
        asl_maps, fd_maps = [], []
        for prob, max_cos in zip(window_probs, window_cos):  # the checkpoint's ASL weights, per level
            asl_map = stitch_windows(self._to_win(prob), geom)
            if self.opts.win_use_nam and self.opts.use_nam:
                asl_map = self.head.refine(asl_map)  # NAM on the stitched [1 - a, a] map (docs/design/fdsl.md s.5)
            asl_maps.append(asl_map)
            fd_maps.append(stitch_windows(self._to_win(1.0 - max_cos), geom))
        return _combine(asl_maps, fd_maps, self.opts.fd_weight)

    def _zoomed_window_maps(
        self, probs: list[torch.Tensor], fd: list[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`--win-resolution zoomed`: the window branch on the zoomed grid G' (B, G', G'), score (B,).

        Every shared window holds the zoomed tokens it covers unchanged, and the stitch averages identical values, so
        the stitched map at G' is the per-token map itself: it is kept at G' (more cells per defect) instead of each
        window being resized to win x win cells of the main grid first. NAM refines it as it refines the stitched map.
        """
        if self.opts.win_use_nam and self.opts.use_nam:
            probs = [self.head.refine(p) for p in probs]
        return _combine(probs, fd, self.opts.fd_weight)

    def _to_win(self, maps: torch.Tensor) -> torch.Tensor:
        """(N, t, t) window maps at the encoded resolution -> (N, win, win) (zoomed windows are resized back)."""
        win = self.geometry.win
        if maps.shape[-1] == win:
            return maps
        return F.interpolate(maps[:, None], size=(win, win), mode="bilinear", align_corners=False)[:, 0]

    def report(self) -> dict:
        """results.json extras: the bank bytes of the last class set up."""
        return {"bank_bytes": dict(self.memory)}

    @torch.inference_mode()
    def predict(self, images: torch.Tensor) -> DetectorOutput:
        """(B, 3, S, S) normalised images -> pred_score (B,), anomaly_map (B, G, G) on the finest feature grid.

        With `score_from_map` the score is None: the evaluator takes the maximum of the upsampled, smoothed map.
        """
        with torch.autocast("cuda", dtype=torch.float16, enabled=self.opts.autocast and images.is_cuda):
            score, anomaly_map = self._predict(images)
        score, anomaly_map = score.float(), anomaly_map.float()
        if self.opts.map_size is not None:  # the original upsamples with align_corners=True (--map-align-corners)
            anomaly_map = upsample_map(anomaly_map, self.opts.map_size, align_corners=self.opts.map_align_corners)
        return DetectorOutput(None if self.opts.score_from_map else score, anomaly_map)

    def _predict(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        require_setup(bool(self.bank), type(self).__name__)
        b = self.opts.knn_weight
        if b == 0:
            return self._fdsl(images)
        levels, raw = self._encode(self._main_input(images))
        score, fdsl_map = self._fdsl(images, levels)
        knn_map = self.knn.zscores(raw)  # (B, G, G) on the main grid
        if knn_map.shape[-1] != fdsl_map.shape[-1]:  # zoomed window maps: the kNN map joins them at G'
            knn_map = F.interpolate(knn_map[:, None], size=fdsl_map.shape[-2:], mode="bilinear",
                                    align_corners=False)[:, 0]  # fmt: skip
        return (1 - b) * score + b * knn_map.flatten(1).amax(1), (1 - b) * fdsl_map + b * knn_map

    def _fdsl(self, images: torch.Tensor, levels: list[torch.Tensor] | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """FDSL's own score (B,) and map (main, window or blended branch); `levels` = `encode(images)` if known."""
        mode, w = self.opts.win_mode, self.opts.win_weight
        if mode != "onlywin":
            main_map, main_score = self._main_branch(images, levels)
            if mode == "nan":
                return main_score, main_map
        # LFE on as many images at once as `window_batch_bytes` allows (one at a time for ViT-L's 169 windows).
        step = self._images_per_window_step()
        parts = [self._window_branch(images[i : i + step]) for i in range(0, images.shape[0], step)]
        win_map, win_score = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        if mode == "onlywin":
            return win_score, win_map
        if win_map.shape[-1] != main_map.shape[-1]:  # zoomed window maps: the main map joins them at G'
            main_map = F.interpolate(main_map[:, None], size=win_map.shape[-2:], mode="bilinear",
                                     align_corners=False)[:, 0]  # fmt: skip
        return (1 - w) * main_score + w * win_score, (1 - w) * main_map + w * win_map  # winmode mul
