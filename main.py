"""PCSNet few-shot anomaly detection: train one model per class on k support images, then evaluate once.

Usage (docs/design/CONTRACT.md):
    python main.py --data-root DIR --k-shot K --seed S --save-dir OUT [--class-name all|NAME]
                   [--backbone NAME] [--image-size N] [--epochs N] [--device D]
    python main.py            # the paper protocol (as the original's usage): configs/pcsnet/paper.yaml, k = 2,
                              # data from --data-root, else $MVTEC_ROOT, else ./data/mvtec; OUT = runs/pcsnet_paper
Writes OUT/results.json, OUT/log.txt and OUT/checkpoints/<class>.pt. Settings: dataclass defaults (the CPU
setting) < `--config FILE` (e.g. configs/pcsnet/paper.yaml) < flags. `--paper` is the no-argument run with flags
on top (e.g. `python main.py --paper --k-shot 8 --select best-of-evals`).
Under torchrun (`torchrun --standalone --nproc_per_node N main.py ...`) class i runs on rank i % N and rank 0
writes the merged results. `--resume` records each finished class in OUT/classes/<class>.json and skips them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from common.config import add_fields
from common.evaluation import add_report_arguments, report_images_option
from common.utils import (  # noqa: E402
    UserError,
    check_output_outside,
    check_writable_dir,
    cli_entry,
    parse_device,
    resolve_workers,
    set_seed,
)
from pcsnet.config import PCSNetConfig

REPO = Path(__file__).resolve().parent
PAPER_CONFIG = REPO / "configs" / "pcsnet" / "paper.yaml"
PAPER_K_SHOT = 2  # docs/design/pcsnet.md section 4: the original hard-codes k = 2
PAPER_SAVE_DIR = "runs/pcsnet_paper"
PAPER_DATA_ROOT = "./data/mvtec"
# The PCSNet options that are flags of main.py (`--image-size`, ...; generated from the PCSNetConfig fields, with
# their help and default); every option, these included, is also a YAML key and a `--set KEY=VALUE`.
FLAG_FIELDS = ("backbone", "pretrained", "image_size", "epochs", "grid_size", "cas_width", "refresh_prototypes",
               "aug_pool", "batch_size", "pdc_mode", "fuse_pfa", "num_workers", "precision", "select")  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    """The CONTRACT flags plus PCSNet's own (None = take the config's value)."""
    p = argparse.ArgumentParser(description="PCSNet (TNNLS 2024) few-shot anomaly detection: train per class, test.")
    p.add_argument("--data-root", "--dataset-root", dest="data_root", metavar="DIR",
                   help="dataset folder with meta.json (required, except in paper mode)")  # fmt: skip
    p.add_argument("--k-shot", type=int, help="support images per class (>= 1; required, except in paper mode: 2)")
    p.add_argument("--seed", type=int, default=0, help="support draw, pseudo anomalies and init (default 0)")
    p.add_argument("--save-dir", metavar="OUT",
                   help=f"results.json, log.txt, checkpoints/ (required, except in paper mode: {PAPER_SAVE_DIR})")
    p.add_argument("--paper", action="store_true",
                   help="the paper protocol, as `python main.py` with no arguments: --config configs/pcsnet/paper.yaml"
                   f", k {PAPER_K_SHOT}, data root $MVTEC_ROOT or {PAPER_DATA_ROOT}, save dir {PAPER_SAVE_DIR}")
    p.add_argument("--class-name", default="all", help="'all' (default) or one class name")
    p.add_argument("--device", default=None, help="cpu, a CUDA index such as 0, or cuda:N (default: best available)")
    p.add_argument("--config", metavar="YAML", help="config file, e.g. configs/pcsnet/paper.yaml")
    add_fields(p, PCSNetConfig, FLAG_FIELDS)  # unset flags stay out of the namespace: the config's value holds
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any PCSNet config option (YAML value), e.g. --set lr_cas=0.001; repeatable")  # fmt: skip
    p.add_argument("--vis-dir", metavar="DIR", help="write heat-map PNG panels of every test image here")
    p.add_argument("--no-checkpoints", action="store_true", help="do not write checkpoints/<class>.pt")
    p.add_argument("--save-checkpoints", action="store_true",
                   help="write checkpoints/<class>.pt where the config does not (paper.yaml: off, fp16 when on)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument(
        "--resume",
        action="store_true",
        help="record each finished class in OUT/classes/<class>.json and skip the classes recorded there by an "
        "earlier run with the same options (refuses records from other options)",
    )
    add_report_arguments(p)
    return p


def resolve_config(args: argparse.Namespace):
    """Dataclass < YAML < flags."""
    import yaml

    from pcsnet.config import load_config

    overrides = {name: getattr(args, name) for name in FLAG_FIELDS if hasattr(args, name)}
    if args.no_checkpoints and args.save_checkpoints:
        raise UserError("--no-checkpoints and --save-checkpoints contradict each other; give one")
    if args.no_checkpoints or args.save_checkpoints:
        overrides["save_checkpoints"] = args.save_checkpoints
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--set expects KEY=VALUE, got {item!r}")
        parsed = yaml.safe_load(value)
        if isinstance(parsed, str):  # YAML 1.1 reads 1e-3 as a string
            try:
                parsed = float(parsed)
            except ValueError:
                pass
        overrides[key.strip().replace("-", "_")] = parsed
    return load_config(args.config, overrides)


def apply_paper_defaults(args: argparse.Namespace) -> None:
    """Paper mode (`python main.py` alone, or --paper): fill what the original's usage leaves out; say what ran."""
    if not args.paper:
        return
    if args.config is None:
        args.config = str(PAPER_CONFIG)
    if args.data_root is None:
        args.data_root = os.environ.get("MVTEC_ROOT") or PAPER_DATA_ROOT
        args.data_root_source = "$MVTEC_ROOT" if os.environ.get("MVTEC_ROOT") else "default"
    if args.k_shot is None:
        args.k_shot = PAPER_K_SHOT
    if args.save_dir is None:
        args.save_dir = PAPER_SAVE_DIR
    print(f"paper protocol: config {args.config}, data {args.data_root}, k {args.k_shot}, seed {args.seed}, "
          f"classes {args.class_name}, results in {args.save_dir}", flush=True)  # fmt: skip


def check_args(args: argparse.Namespace) -> None:
    for flag, value in (("--data-root", args.data_root), ("--k-shot", args.k_shot), ("--save-dir", args.save_dir)):
        if value is None:
            raise UserError(f"{flag} is required (or run `python main.py` with no arguments, or --paper, for the "
                            "paper protocol)")  # fmt: skip
    if args.k_shot < 1:
        raise UserError(f"--k-shot must be at least 1, got {args.k_shot}")
    report_images_option(args.report_images, args.no_report)
    resolve_workers(getattr(args, "num_workers", None))  # a negative count fails here, before any model work
    root = Path(args.data_root)
    if not root.is_dir():
        if getattr(args, "data_root_source", None):
            where = "$MVTEC_ROOT" if args.data_root_source == "$MVTEC_ROOT" else f"the default {PAPER_DATA_ROOT}"
            raise UserError(f"no dataset at {root} ({where}): put MVTec AD there and run `python data/mvtec.py "
                            f"--root {root}`, or set MVTEC_ROOT / pass --data-root DIR")  # fmt: skip
        raise UserError(f"--data-root {root} is not a folder")
    if args.config and not Path(args.config).is_file():
        raise UserError(f"--config {args.config} does not exist")
    save = Path(args.save_dir).resolve()
    if save == root.resolve() or root.resolve() in save.parents:
        raise UserError(f"--save-dir {args.save_dir} is inside the dataset folder {root}; choose another folder")


def select_classes(meta: dict, class_name: str) -> list[str]:
    """The test classes to run: all of them, or the one named (UserError listing the known ones otherwise)."""
    from data.meta import class_names

    known = class_names(meta, "test")
    if class_name == "all":
        return known
    if class_name not in known:
        raise UserError(f"unknown class '{class_name}' (--class-name); known: {', '.join(known)}")
    return [class_name]


def run_key(args: argparse.Namespace, cfg) -> dict:
    """What a recorded class result depends on: data, k, seed and the resolved config (as JSON would store it)."""
    from pcsnet.config import config_to_dict

    config = {k: v for k, v in config_to_dict(cfg).items() if k not in ("save_checkpoints", "num_workers")}
    key = {"data_root": str(Path(args.data_root).resolve()), "k_shot": args.k_shot, "seed": args.seed, "config": config}
    return json.loads(json.dumps(key))


def load_finished(save_dir: Path, classes: list[str], key: dict) -> dict[str, dict]:
    """The class records of an earlier `--resume` run in SAVE_DIR/classes/; UserError if one has other options."""
    done = {}
    for name in classes:
        path = save_dir / "classes" / f"{name}.json"
        if not path.is_file():
            continue
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise UserError(f"--resume: cannot read {path}: {exc}") from exc
        if record.get("run") != key:
            old, new = record.get("run") or {}, key
            diffs = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
            if "config" in diffs:
                oc, nc = old.get("config") or {}, new["config"]
                diffs += [k for k in sorted(set(oc) | set(nc)) if oc.get(k) != nc.get(k)]
            raise UserError(
                f"--resume: {path} was recorded with other options ({', '.join(d for d in diffs if d != 'config')}); "
                "use the same options or another --save-dir"
            )
        done[name] = record
    return done


@cli_entry
def main(argv: list[str] | None = None) -> int:
    """Train and evaluate PCSNet on every selected class; write results.json and log.txt."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.paper = args.paper or not argv  # no arguments at all: the original's `python main.py`
    apply_paper_defaults(args)
    check_args(args)
    cfg = resolve_config(args)
    if cfg.backbone == "wide_resnet50_2":
        from common.backbones import wrn_weights_path

        wrn_weights_path(cfg.pretrained)  # missing weights: one line before any folder or model work
    from common import distributed

    device = distributed.init(parse_device(args.device))
    check_output_outside(args.save_dir, args.data_root, "--save-dir")
    save_dir = check_writable_dir(args.save_dir)

    from common.backbones import build_backbone
    from common.evaluation import check_eval_inputs, timing_breakdown
    from common.few_shot import sample_support
    from common.results import build_results, write_results
    from common.utils import atomic_write_json
    from data.meta import load_meta
    from engine.loop import ClassResult, EvalConfig, evaluate_sharded
    from engine.reporting import EvalReport, remove_stale
    from pcsnet.config import config_to_dict
    from pcsnet.trainer import PCSNetDetector

    meta = load_meta(args.data_root)
    classes = select_classes(meta, args.class_name)
    check_eval_inputs(meta, args.data_root, classes, args.k_shot, args.seed)  # before loading any weights
    set_seed(args.seed)
    key = run_key(args, cfg)
    # rank 0 reads the records and hands them to the others, so every rank agrees on what is left to run
    done = distributed.gather_objects(
        load_finished(save_dir, classes, key) if args.resume and distributed.is_main() else {}
    )[0]
    todo = [c for c in classes if c not in done]
    backbone = build_backbone(cfg.backbone, pretrained=cfg.pretrained, layers=cfg.layers, device=device,
                              precision=cfg.precision, wrn_export=cfg.wrn_export)  # fmt: skip
    detector = PCSNetDetector(
        backbone, cfg, args.seed, save_dir if cfg.save_checkpoints else None,
        support_paths=lambda name: sample_support(meta, name, args.k_shot, args.seed),
        progress=not args.quiet and distributed.is_main(),
    )  # fmt: skip

    def record(name: str, result) -> None:
        history = detector.histories.get(name)
        atomic_write_json(save_dir / "classes" / f"{name}.json", {
            "run": key, "metrics": result.metrics, "support": result.support, "n_images": result.n_images,
            "seconds": result.seconds, "train_seconds": detector.train_seconds.get(name, 0.0),
            "setup_seconds": result.setup_seconds, "backbone_seconds": result.backbone_seconds,
            "data_seconds": result.data_seconds,
            "final_loss": history[-1] if history else None, "evals": selector.evals.get(name) if selector else None,
        })  # fmt: skip

    report_images = report_images_option(args.report_images, args.no_report)
    report = EvalReport(args.data_root, report_images) if report_images is not None else None
    eval_cfg = EvalConfig(
        dataset_root=args.data_root, k_shot=args.k_shot, seed=args.seed, image_size=cfg.image_size,
        mean=backbone.mean, std=backbone.std, class_names=todo, batch_size=cfg.test_batch_size,
        num_workers=resolve_workers(cfg.num_workers, device),
        smooth_sigma=cfg.smooth_sigma, device=device, vis_dir=args.vis_dir, class_done=record if args.resume else None,
        resize_size=cfg.resolved_resize(), resample=cfg.resample,
        observers=[report] if report is not None else [],
    )  # fmt: skip
    selector = None
    if cfg.select == "best-of-evals":
        from pcsnet.selection import BestOfEvals

        selector = BestOfEvals(detector, eval_cfg)
        detector.on_eval = selector
    if done and distributed.is_main():
        print(f"--resume: {len(done)} class(es) already recorded in {save_dir / 'classes'}: {', '.join(done)}")
    start = time.perf_counter()
    fresh, train_s, final_losses, evals, sections = {}, {}, {}, {}, {}
    if todo:
        fresh, _, payloads = evaluate_sharded(
            detector, eval_cfg, progress=not args.quiet and distributed.is_main(),
            payload=lambda: (detector.train_seconds, {c: h[-1] if h else None for c, h in detector.histories.items()},
                             selector.evals if selector else {}, report.sections if report else {}),
        )  # fmt: skip
        for seconds, losses, passes, rendered in payloads:
            train_s.update(seconds)
            final_losses.update(losses)
            evals.update(passes)
            sections.update(rendered)
    total = time.perf_counter() - start
    for name, rec in done.items():
        fresh[name] = ClassResult(rec["metrics"], rec["support"], rec["n_images"], rec["seconds"],
                                  setup_seconds=rec.get("setup_seconds"), backbone_seconds=rec.get("backbone_seconds"),
                                  data_seconds=rec.get("data_seconds"))  # fmt: skip
        train_s[name], final_losses[name] = rec["train_seconds"], rec["final_loss"]
        if rec.get("evals") is not None:
            evals[name] = rec["evals"]
        total += rec["seconds"]
    per_class = {c: fresh[c] for c in classes}
    train_s = {c: train_s[c] for c in classes if c in train_s}
    test_s = {c: r.seconds - train_s.get(c, 0.0) for c, r in per_class.items()}
    n_images = sum(r.n_images for r in per_class.values())
    extra = {"pcsnet": {
        "config": config_to_dict(cfg),
        "train_seconds": train_s,
        "test_seconds_per_image": sum(test_s.values()) / max(n_images, 1),
        "final_losses": {c: final_losses.get(c) for c in classes},
    }}  # fmt: skip
    if selector is not None:
        from pcsnet.selection import results_block

        extra["best_of_evals"] = results_block(evals, classes)  # beside, never instead of, the last-epoch numbers
    results = build_results(
        "pcsnet", args.data_root, args.k_shot, args.seed, cfg.backbone, cfg.image_size,
        {c: r.metrics for c, r in per_class.items()}, {c: r.support for c, r in per_class.items()},
        n_images, total, extra=extra, timing=timing_breakdown(per_class),
    )  # fmt: skip
    log = [f"{c}: train {train_s.get(c, 0.0):.1f} s, test {test_s[c] / max(per_class[c].n_images, 1):.3f} s/image"
           for c in per_class]  # fmt: skip
    if selector is not None:
        best = extra["best_of_evals"]["mean"]
        log.append("best-of-evals (TRANSDUCTIVE, picked on the test set, as the original reports): "
                   + ", ".join(f"{k} {v:.4f}" for k, v in best.items() if v is not None))  # fmt: skip
    distributed.cleanup()
    if distributed.is_main():
        write_results(save_dir, results, log)
        if report is not None:  # after results.json, which the page describes
            report.write(save_dir, results, sections)
        else:
            remove_stale(save_dir)
        print(Path(save_dir, "log.txt").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
