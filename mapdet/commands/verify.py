"""mapdet verify OUT [--split SPLIT]: check every shard against its manifest, decode every sample.

Checks each shard's presence, byte size, sha256 and sample count, that keys appear in manifest
order, and that every image and record decodes with boxes inside the image and labels in 1..K,
and that the splits checked together have the same classes (the same class set).
Also flags tar files in OUT that no manifest lists. Exits 1 listing every problem, 0 when clean,
2 when OUT holds no manifest (not a pack output folder).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tqdm import tqdm

from mapdet.shards.manifest import ManifestError, classes_mismatch, load_manifest, sha256_file
from mapdet.shards.reader import CorruptSample, decode_sample, read_shard


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("out", help="a folder written by `mapdet pack`")
    p.add_argument(
        "--split",
        action="append",
        default=None,
        help="split to check (repeatable; default: every *.manifest.json in OUT)",
    )


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    splits = args.split or sorted(p.name[: -len(".manifest.json")] for p in out.glob("*.manifest.json"))
    if not splits:
        print(f"mapdet verify: error: no *.manifest.json in {out} (run `mapdet pack` first)", file=sys.stderr)
        return 2
    problems, listed, loaded = [], set(), []
    for split in splits:
        try:
            manifest = load_manifest(out, split)
        except ManifestError as e:
            problems.append(str(e))
            continue
        listed |= {s["name"] for s in manifest["shards"]}
        problems += check_split(out, manifest)
        # splits of one folder train and evaluate one model: their classes must agree
        problems += [why for other in loaded if (why := classes_mismatch(other, manifest))]
        loaded.append(manifest)
    problems += [f"{p.name}: not listed in any manifest" for p in sorted(out.glob("*.tar")) if p.name not in listed]
    for line in problems:
        print(f"PROBLEM {line}")
    print(f"verify {out}: {len(splits)} split(s), {len(problems)} problem(s)")
    return 1 if problems else 0


def check_split(out: Path, manifest: dict) -> list[str]:
    """Every problem found in one split's shards, as lines naming shard and key."""
    problems = []
    k = len(manifest["classes"])
    for shard in tqdm(manifest["shards"], desc=f"verify {manifest['split']}", unit="shard"):
        path = out / shard["name"]
        if not path.exists():
            problems.append(f"{shard['name']}: missing")
            continue
        if path.stat().st_size != shard["bytes"]:
            problems.append(f"{shard['name']}: {path.stat().st_size} bytes, manifest says {shard['bytes']}")
        if sha256_file(path) != shard["sha256"]:
            problems.append(f"{shard['name']}: sha256 differs from the manifest")
        problems += _check_samples(path, shard, k)
    return problems


def _check_samples(path: Path, shard: dict, num_classes: int) -> list[str]:
    problems, keys = [], []
    try:
        for sample in read_shard(path):
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
    except Exception as e:  # a truncated or garbled tar stops the read; say where
        problems.append(f"{shard['name']}: unreadable after {len(keys)} samples: {type(e).__name__}: {e}")
    if keys != shard["keys"]:
        problems.append(
            f"{shard['name']}: holds {len(keys)} samples, manifest lists {shard['num_samples']} (keys differ)"
        )
    return problems
