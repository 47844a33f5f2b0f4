"""Explain a low mAP: ranked causes with measured impact, error decomposition, sweeps, figures.

    mapdet diagnose --gt validation.coco.json --results detections.json --out diag/ \\
        [--train-manifest shards/training.manifest.json] [--run runs/exp] \\
        [--checkpoint runs/exp/checkpoints/step_0090000 --config runs/exp/config.yaml]

Writes OUT/report.md (with PNG figures beside it) and OUT/diagnosis.json; with --run also the
loss-vs-mAP curves from the run's TensorBoard events (and what training longer would add), and
the diagnosis into RUN/tensorboard/diagnose. With --checkpoint and --config the model runs once per
validation image (shards from the config's data section) for proposal recall and a post-processing
sweep. Every cause's impact is the COCO AP (maxDets 100) fixing it alone is estimated to add; with
--config every cause carries ``set``: overrides to try that fit the config in force.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mapdet.cli import number
from mapdet.fileio import read_json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--gt", required=True, help="COCO ground truth (e.g. shards/validation.coco.json)")
    parser.add_argument("--results", required=True, help="COCO results list (image_id, category_id, bbox, score)")
    parser.add_argument("--out", required=True, help="folder for report.md, diagnosis.json and figures")
    parser.add_argument(
        "--train-manifest",
        help="training.manifest.json: class frequencies of the training set "
        "(without it the evaluated ground truth stands in, and the report says so)",
    )
    parser.add_argument(
        "--run",
        help="training run folder: loss/mAP curves from its TensorBoard events, "
        "and the diagnosis logged to RUN/tensorboard/diagnose",
    )
    parser.add_argument("--config", help="the run's config YAML (model.anchor_sizes, detections_per_img, ...)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides")
    parser.add_argument(
        "--checkpoint",
        help="latest (of train.out) | a checkpoint folder | a weights file "
        "(.safetensors/.pth): enables proposal recall and the post-processing sweep (needs --config)",
    )
    parser.add_argument(
        "--detections-per-img",
        type=number(int, 1),
        help="the model's per-image cap that produced the "
        "results (default: the config's model.detections_per_img; without --config, the cap the "
        "results show: many images holding exactly the same largest number of detections). A cap "
        "the results contradict is reported, and the results' cap used",
    )
    parser.add_argument(
        "--repeat-threshold",
        type=number(float, 0, 1, open="lo"),
        help="t for repeat factors and the 'rare' cut-off (default: the config's data.repeat_threshold, else the "
        "frequency two thirds of the classes are below, as LVIS's 0.001 is on LVIS)",
    )
    parser.add_argument(
        "--loc-reference-iou",
        type=number(float, 0, 1),
        default=None,
        help="IoU a better-localizing model is credited with (default 0.75; less for tiny boxes): localization "
        "counts only the AP below it",
    )
    parser.add_argument(
        "--sweep-images", type=number(int, 1), default=200, help="validation images for the model checks"
    )
    parser.add_argument("--sweep-nms", type=number(float, 0, 1), nargs="+", default=[0.3, 0.4, 0.5, 0.6, 0.7])
    parser.add_argument("--sweep-score", type=number(float, 0, 1), nargs="+", default=[0.0, 0.05, 0.1, 0.3])
    parser.add_argument("--sweep-dets", type=number(int, 1), nargs="+", default=[100, 300, 1000])


def run(args) -> int:
    from mapdet.config import ConfigError, load_config
    from mapdet.diagnosis import measures, report
    from mapdet.evaluation.inputs import detections_from_results

    try:
        cfg = load_config(args.config, args.set)
    except ConfigError as e:
        return _fail(str(e))
    if args.checkpoint and not args.config:
        return _fail("--checkpoint needs --config (the model's architecture and the validation shards)")
    if args.run and not Path(args.run).is_dir():
        return _fail(f"--run {args.run}: no such run folder (the train.out of a training run)")
    inputs = _read_inputs(args)
    if inputs is None:
        return 2
    gt, results, manifest = inputs
    if args.loc_reference_iou is not None and not 0.5 <= args.loc_reference_iou <= 1.0:
        return _fail(f"--loc-reference-iou {args.loc_reference_iou}: choose an IoU in [0.5, 1]")
    settings = _settings(args, cfg)
    try:
        dets = detections_from_results(results)
        _check_ids(gt, dets)
    except ValueError as e:
        return _fail(f"cannot diagnose {args.results} against {args.gt}: {e}")
    evidence = _run_evidence(args.run, manifest) if args.run else None
    sweep = proposal_recall = None
    if args.checkpoint:
        try:
            sweep, proposal_recall = _model_checks(args, cfg)
        except (FileNotFoundError, ValueError) as e:
            return _fail(f"model checks: {e}")
    try:
        d = measures.diagnose(gt, dets, manifest, settings, evidence, sweep, proposal_recall)
    except ValueError as e:
        return _fail(f"cannot diagnose {args.results} against {args.gt}: {e}")
    paths = report.write_report(d, args.out)
    if args.run:
        text = paths["report"].read_text()
        figures = {k: p for k, p in paths.items() if k not in ("report", "json")}
        report.log_tensorboard(d, text, figures, Path(args.run) / "tensorboard" / "diagnose")
    _print_summary(d, paths["report"])
    return 0


def _settings(args, cfg):
    """What the diagnosis needs from the arguments and the config; the config counts as in force
    (advice respects it) only when given with --config."""
    from mapdet.diagnosis.fixes import LOC_REFERENCE_IOU
    from mapdet.diagnosis.settings import DiagnoseSettings

    cap_from = (
        "--detections-per-img"
        if args.detections_per_img is not None
        else "the config's model.detections_per_img"
        if args.config or any(kv.startswith("model.detections_per_img=") for kv in args.set)
        else None
    )
    return DiagnoseSettings(
        model=cfg.model,
        cap=args.detections_per_img,
        cap_from=cap_from,
        repeat_threshold=args.repeat_threshold or cfg.data.repeat_threshold,
        loc_reference_iou=LOC_REFERENCE_IOU if args.loc_reference_iou is None else args.loc_reference_iou,
        config=cfg if args.config else None,
        progress=True,
    )


def _check_ids(gt: dict, dets) -> None:
    """ValueError naming detections on images or classes the ground truth lacks (before the slow part)."""
    from mapdet.evaluation.inputs import GroundTruth, detection_rows

    detection_rows(dets, GroundTruth.parse(gt))


def _run_evidence(run_dir: str, manifest: dict | None):
    """The run's curves, its last checkpoint's meta.json and the training split's size."""
    from mapdet.diagnosis.curves import RunEvidence, run_meta, training_curves
    from mapdet.modeling import run_weights

    return RunEvidence(
        training_curves(run_dir), run_meta(run_weights.latest(run_dir)), manifest["num_samples"] if manifest else None
    )


def _model_checks(args, cfg):
    """Proposal recall and post-processing sweep with the checkpoint on the validation shards."""
    import torch

    from mapdet.data.loaders import eval_loader
    from mapdet.diagnosis.sweep import run_model_checks
    from mapdet.modeling import run_weights
    from mapdet.modeling.build import build_inference_model
    from mapdet.shards.manifest import load_manifest
    from mapdet.shards.source import shard_source

    shards = shard_source(cfg.data.shards, cfg.data)
    manifest = load_manifest(shards, cfg.data.val_split)
    cat_ids = [int(c["id"]) for c in manifest["classes"]]
    model = build_inference_model(cfg.model, len(cat_ids) + 1)
    model.load_state_dict(run_weights.load_weights(cfg.train.out, args.checkpoint)[0])
    model.to("cuda" if torch.cuda.is_available() else "cpu")
    loader = eval_loader(shards, manifest, cfg.eval.batch_size, cfg.eval.workers, rank=0, world=1)
    current = (cfg.model.nms_thresh, cfg.model.score_thresh, cfg.model.detections_per_img)
    return run_model_checks(
        model,
        loader,
        cat_ids,
        args.sweep_nms,
        args.sweep_score,
        args.sweep_dets,
        current,
        max_images=args.sweep_images,
        progress=True,
    )


def _read_inputs(args) -> tuple | None:
    """(ground truth, results, training manifest or None); None after naming every file that is
    missing or not JSON (all of them at once: one rerun fixes them all)."""
    named = (("ground truth", args.gt), ("results", args.results), ("training manifest", args.train_manifest))
    read, errors = [], []
    for what, path in named:
        try:
            read.append(read_json(path, what) if path else None)
        except ValueError as e:
            errors.append(str(e))
    for message in errors:
        _fail(message)
    return None if errors else tuple(read)


def _fail(message: str) -> int:
    print(f"mapdet diagnose: {message}", file=sys.stderr)
    return 2


def _print_summary(d, report_path: Path) -> None:
    from mapdet.diagnosis.report import set_line

    s = d.summary
    head = f"AP {s.AP:.1f}  AP50 {s.AP50:.1f}  ({s.num_images} images)" if s.AP is not None else None
    print(head or "AP undefined: no ground truth")
    choice = d.max_dets.choice
    print(f"detection cap {choice.model_cap}: {choice.cap_source}")
    if choice.cap_note:
        print(f"  note: {choice.cap_note}")
    print("causes (COCO AP at maxDets 100 gained by fixing each alone):")
    for c in d.causes:
        if c.impact > 0:
            print(f"  {c.cause:<16} {c.impact:6.1f}  {set_line(c.set) if c.set else c.advice}")
    print(f"report: {report_path}")
