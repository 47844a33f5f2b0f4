"""mapdet verify OUT [--split SPLIT]: check every shard against its manifest, decode every sample.

OUT is a folder, an http(s):// base URL or a pipe: command with {name} (``mapdet.shards.source``).
Checks each shard's presence, byte size, sha256 and sample count, that keys appear in manifest
order, and that every image and record decodes with boxes inside the image and labels in 1..K,
and that the splits checked together have the same classes (the same class set). Each shard is
read once (hashed while it is decoded), so a remote shard is downloaded once.
Without --split: every *.manifest.json of a folder; at a URL or command, which cannot be listed,
the training and validation splits (those present). A folder's tar files that no manifest lists
are flagged too. Exits 1 listing every problem, 0 when clean,
2 when a folder holds no manifest (not a pack output folder).
"""

from __future__ import annotations

import argparse
import sys

from tqdm import tqdm

from mapdet.config import DataConfig
from mapdet.shards.manifest import ManifestError, NoManifest, classes_mismatch, load_manifest
from mapdet.shards.reader import CorruptSample, decode_sample, describe_error, tar_samples
from mapdet.shards.source import SOURCE_HELP, Digest, ShardSource, shard_source


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("out", help=SOURCE_HELP)
    p.add_argument(
        "--split",
        action="append",
        default=None,
        help="split to check (repeatable; default: every *.manifest.json of a folder; "
        "training and validation at a URL or command)",
    )


def run(args: argparse.Namespace) -> int:
    source = shard_source(args.out)
    local = source.local_dir
    if args.split:
        splits = args.split
    elif local is not None:
        splits = sorted(p.name[: -len(".manifest.json")] for p in local.glob("*.manifest.json"))
    else:  # nothing can be listed remotely: the splits training and evaluation read by default
        splits = [DataConfig.train_split, DataConfig.val_split]
    if not splits:
        print(f"mapdet verify: error: no *.manifest.json in {local} (run `mapdet pack` first)", file=sys.stderr)
        return 2
    problems, listed, loaded = [], set(), []
    for split in splits:
        try:
            manifest = load_manifest(source, split)
        except NoManifest as e:
            if args.split or local is not None:
                problems.append(str(e))
            continue
        except ManifestError as e:
            problems.append(str(e))
            continue
        listed |= {s["name"] for s in manifest["shards"]}
        problems += check_split(source, manifest)
        # splits of one folder train and evaluate one model: their classes must agree
        problems += [why for other in loaded if (why := classes_mismatch(other, manifest))]
        loaded.append(manifest)
    if not loaded and not problems:
        where = f"in {local}" if local is not None else f"for {', '.join(splits)} at {source.location}"
        print(f"mapdet verify: error: no *.manifest.json {where} (run `mapdet pack`, or name --split)", file=sys.stderr)
        return 1
    if local is not None:
        unlisted = [p.name for p in sorted(local.glob("*.tar")) if p.name not in listed]
        problems += [f"{name}: not listed in any manifest" for name in unlisted]
    for line in problems:
        print(f"PROBLEM {line}")
    print(f"verify {source.location}: {len(loaded)} split(s), {len(problems)} problem(s)")
    return 1 if problems else 0


def check_split(source: ShardSource, manifest: dict) -> list[str]:
    """Every problem found in one split's shards, as lines naming shard and key."""
    problems = []
    for shard in tqdm(manifest["shards"], desc=f"verify {manifest['split']}", unit="shard"):
        problems += _check_shard(source, shard, len(manifest["classes"]))
    return problems


def _check_shard(source: ShardSource, shard: dict, num_classes: int) -> list[str]:
    """Size, sha256 and every sample of one shard, in one read of its bytes."""
    name = shard["name"]
    try:
        stream = source.open(name)
    except FileNotFoundError:
        return [f"{name}: missing"]
    except OSError as e:  # a remote read that failed after its retries; the message names the shard
        return [str(e)]
    with stream:
        digest = Digest(stream)
        problems, read_failed = _check_samples(tar_samples(digest, source.where(name)), shard, num_classes)
        try:
            size, sha256 = digest.finish()
        except OSError as e:
            return problems if read_failed else [*problems, f"{name}: unreadable after the tar's end: {e}"]
    if size != shard["bytes"]:
        problems.append(f"{name}: {size} bytes, manifest says {shard['bytes']}")
    if sha256 != shard["sha256"]:
        problems.append(f"{name}: sha256 differs from the manifest")
    return problems


def _check_samples(samples, shard: dict, num_classes: int) -> tuple[list[str], bool]:
    """(problems, whether reading stopped at a fault) for one shard's samples."""
    problems, keys, read_failed = [], [], False
    try:
        for sample in samples:
            keys.append(sample["__key__"])
            try:
                _, target = decode_sample(sample, num_classes)
            except CorruptSample as e:
                problems.append(str(e))
                continue
            if target["sanitized"]:
                problems.append(
                    f"{shard['name']}: sample {sample['__key__']!r} has {target['sanitized']} box(es) outside "
                    f"the image or with labels outside 1..{num_classes}"
                )
    except Exception as e:  # a truncated or garbled tar, or a failed remote read, stops the read; say where
        problems.append(f"{shard['name']}: unreadable after {len(keys)} samples: {describe_error(e)}")
        read_failed = True
    if keys != shard["keys"]:
        problems.append(
            f"{shard['name']}: holds {len(keys)} samples, manifest lists {shard['num_samples']} (keys differ)"
        )
    return problems, read_failed
