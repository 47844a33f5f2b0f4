"""mapdet predict (--weights RUN/export/model.safetensors | --checkpoint RUN[/checkpoints/step_N])
               (--images DIR | --shards DIR [--split validation]) --out results.json [--draw DIR]

Runs a trained detector on a folder of images of any sizes (``.jpg``/``.jpeg``/``.png``, searched
recursively) or on packed shards (a folder, an http(s):// URL or a ``pipe:`` command with
``{name}``: ``mapdet.shards.source``), and writes a COCO results list to ``--out``::

    [{"image_id": 3, "file_name": "a/b.jpg", "category_id": 7, "bbox": [x, y, w, h], "score": 0.93}, ...]

``bbox`` is xywh in the image's own pixels: for a folder the original file; for shards the packed
image, like ``{split}.coco.json``, except a pack made from COCO JSON (``mapdet pack --coco``), whose
results are in the pixels of the original images, so the file scores against the user's own
annotations with any COCO tool (the same numbers unless packed with ``--max-side``); the model
resizes internally and maps boxes back. ``category_id`` is the COCO category id of the class: the
original file's for a model trained on a COCO pack (classes.json / manifest ``category_id``), else
the class id 1..K. Folder: ``image_id`` is the file's position in the sorted list of relative
paths plus one, and ``file_name`` that path. Shards: ``image_id`` is the sample's (``{split}.coco.json``;
a COCO pack's own ids), no file_name; the list then holds the same detections as ``mapdet
evaluate``'s detections.json for the same weights (the same boxes too unless a COCO pack was
resized). Results are sorted by image id (within an image, highest score first), whatever the
number of processes. ``--score-thresh`` filters the file (default 0: every detection the model
keeps, as evaluate). Images of different sizes batched together are padded to one size, which
moves scores slightly (near-ties may swap): ``--batch-size 1`` gives exactly one model call per
image. ``--draw DIR`` writes every image with its boxes scoring >= ``--draw-thresh`` labelled
"class score", as ``DIR/<relative path or key>.png|jpg``.

Weights: ``--weights`` with the classes.json beside them (or ``--classes``) is enough: it records
the classes and the model settings (``mapdet.modeling.trained``); ``--checkpoint`` reads the run's
config.yaml and training manifest. On every GPU: ``accelerate launch --config_file
launch/accelerate/gpu8.yaml -m mapdet predict ...``: each process predicts a contiguous share (each
image exactly once) and the main process writes the file. Without a launcher, one process.

Exit codes: 0; 1 when some images could not be read (the others are predicted and written, the
unreadable ones counted and named on stderr); 2 for bad arguments (no images, missing classes.json,
weights that do not fit the model settings, ...), with one line saying what to fix.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tqdm import tqdm

from mapdet import comm
from mapdet.cli import number
from mapdet.data.imagefolder import image_loader, shared_listing
from mapdet.data.loaders import eval_keys, eval_loader
from mapdet.drawing import FORMATS, DrawnImages, output_names
from mapdet.engine.inference import describe_bad, predict_gathered, write_results
from mapdet.modeling import trained
from mapdet.shards.manifest import category_id, category_ids, is_coco_pack, load_manifest
from mapdet.shards.source import SOURCE_HELP


def add_arguments(p: argparse.ArgumentParser) -> None:
    weights = p.add_mutually_exclusive_group(required=True)
    weights.add_argument("--weights", help="exported weights (RUN/export/model.safetensors); classes.json beside them")
    weights.add_argument("--checkpoint", help="a run folder (its latest checkpoint) or RUN/checkpoints/step_N")
    p.add_argument("--classes", default=None, help="classes.json (or a shard manifest) if not the default one")
    p.add_argument("--config", default=None, help="training config: model settings for exports that lack them")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", help="folder of .jpg/.jpeg/.png images of any sizes (searched recursively)")
    source.add_argument("--shards", help=SOURCE_HELP)
    p.add_argument("--split", default="validation", help="split of --shards (default: validation)")
    p.add_argument("--out", required=True, help="COCO results JSON to write")
    p.add_argument(
        "--score-thresh",
        type=number(float, 0, 1),
        default=0.0,
        help="keep detections scoring at least this (default: all)",
    )
    p.add_argument("--draw", default=None, metavar="DIR", help="also write each image with its labelled boxes here")
    p.add_argument(
        "--draw-thresh", type=number(float, 0, 1), default=0.5, help="score threshold of the drawn boxes (default 0.5)"
    )
    p.add_argument("--draw-format", choices=FORMATS, default="jpg", help="drawn image format (default jpg)")
    p.add_argument("--batch-size", type=number(int, 1), default=2, help="images per batch per process (default 2)")
    p.add_argument("--workers", type=number(int, 0), default=2, help="image-reading processes per process (default 2)")
    p.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="auto: this process's GPU when there is one, else the CPU",
    )


def run(args: argparse.Namespace) -> int:
    accelerator = comm.make_accelerator(cpu=args.device == "cpu")
    device = accelerator.device
    if args.device == "cuda" and device.type != "cuda":
        raise ValueError("--device cuda: no CUDA device here (use --device auto or cpu)")
    if args.weights:
        detector = trained.from_export(args.weights, args.classes, args.config)
    else:
        detector = trained.from_checkpoint(args.checkpoint, args.classes, args.config)
    loader, keys, mine, file_names, to_original = _folder(args) if args.images else _shards(args, detector)
    drawer = None
    if args.draw:
        names = output_names(keys, args.draw_format, strip_suffix=bool(args.images))
        drawer = DrawnImages(args.draw, names, detector.names, args.draw_thresh)

    bar = tqdm(total=mine, desc="predict", unit="img", disable=not comm.is_main_process())
    found = predict_gathered(
        detector.model.to(device), loader, device, keys, progress=bar, on_batch=drawer, to_original=to_original
    )
    bar.close()
    if comm.is_main_process():
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        detections = found.detections.relabel(category_ids(detector.classes))
        written = write_results(args.out, detections, args.score_thresh, file_names)
        print(
            f"{detector.source}: {found.images} image(s) on {comm.get_world_size()} process(es), {written} "
            f"detection(s){f' scoring >= {args.score_thresh}' if args.score_thresh > 0 else ''}; wrote {args.out}"
        )
        if args.draw:
            print(f"drew boxes scoring >= {args.draw_thresh} on {found.images} image(s) in {args.draw}")
        if found.bad:
            print(
                f"mapdet predict: {len(found.bad)} image(s) could not be read and have no predictions:\n"
                + describe_bad(found.bad),
                file=sys.stderr,
            )
    accelerator.end_training()  # without it multi-process runs sometimes abort at exit (notes)
    return 1 if found.bad else 0


def _folder(args):
    """(loader, every image's key, how many this rank reads, image id -> file name, whether to scale
    boxes to the original images: no, they are the originals) of ``--images``."""
    rank, world = comm.get_rank(), comm.get_world_size()
    files = shared_listing(args.images, exclude=args.draw)
    lo, hi = comm.share(len(files), rank, world)
    loader = image_loader(args.images, files, args.batch_size, args.workers, rank, world)
    return loader, files, hi - lo, {i + 1: f for i, f in enumerate(files)}, False


def _shards(args, detector: trained.Trained):
    """The same for ``--shards``: image ids are the samples' own, so no file names; a COCO pack's
    boxes go back to its original images' pixels."""
    rank, world = comm.get_rank(), comm.get_world_size()
    manifest = load_manifest(args.shards, args.split)
    _check_classes(manifest, detector, args)
    # Corrupt samples are left out and reported like unreadable files (exit 1), not fatal.
    loader = eval_loader(args.shards, manifest, args.batch_size, args.workers, rank, world, skip_corrupt=True)
    keys = [k for s in manifest["shards"] for k in s["keys"]]
    return loader, keys, len(eval_keys(manifest, rank, world)), None, is_coco_pack(manifest)


def _check_classes(manifest: dict, detector: trained.Trained, args) -> None:
    """Shard labels and the model's labels must mean the same classes (label = position in the list)
    with the same COCO category ids."""
    theirs = [(c["id"], c["name"], category_id(c)) for c in manifest["classes"]]
    mine = [(c["id"], c["name"], category_id(c)) for c in detector.classes]
    if theirs != mine:
        first = next((f"{a} here, {b} there" for a, b in zip(mine, theirs) if a != b), "another class count")
        raise ValueError(
            f"the {args.split} split in {args.shards} has other classes ({len(theirs)}) than the model "
            f"({len(mine)}; first difference: {first}): pack it with the training split's class set"
        )
