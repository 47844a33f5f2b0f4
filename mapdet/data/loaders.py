"""Streaming loaders over packed shards: an endless resampled training stream and an exact-once
evaluation stream (samples are read, checked and decoded by ``mapdet.shards.reader``).

Batches are ``mapdet.structures.Batch(images, targets, bad)`` (shapes and box format there).
Training targets leave crowd regions out (torchvision cannot ignore them; detectron2 does the same).
A truncated shard costs all the samples after the damage: its ``bad`` entry counts them. Members
the manifest does not list for a shard are never used. Shards may be remote (``mapdet.shards.source``:
an http(s) URL or a pipe: command): a read that still fails after ``data.stream_retries`` retries is
such a fault too, counted or raised like a truncated shard, and a stall times out, so no rank hangs.

Training (``TrainStream``): each DataLoader worker draws shards with replacement from its own
seeded RNG, optionally repeats images by repeat-factor sampling, shuffles through a buffer and
batches. Every rank yields exactly ``batches_per_epoch`` batches per epoch, so DDP ranks never
wait on each other, and the stream is a pure function of (seed, rank, epoch): a resumed run skips
the batches already consumed (without decoding them) and sees the same data as an unbroken run
(exactly so when that skipped part holds no corrupt sample: not decoding, the skip cannot know
how many samples an unbroken run had to pass over).

Evaluation (``eval_loader``): the manifest's keys, in shard order, are cut into contiguous ranges,
one per (rank, worker); a worker reads only the shards its range overlaps. Every sample is read
exactly once however many ranks and workers there are (also more than shards), and each rank
knows its keys up front (``eval_keys``). A fault raises ``CorruptSample`` naming shard and key;
with ``skip_corrupt`` the images it cost are left out and listed in ``Batch.bad`` instead.

Faults found in a DataLoader worker reach the caller as ``CorruptSample`` raised in the main
process with the worker's one-line message (not wrapped in the worker's traceback); the
DataLoaders, their workers and that relay are ``mapdet.data.workers``.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info

from mapdet.comm import share
from mapdet.data.workers import RaiseFatal, batch_loader, fatal_batch  # batch_loader: see TrainStream.__iter__
from mapdet.shards.manifest import class_image_fractions
from mapdet.shards.reader import (
    CorruptSample,
    bad_entry,
    checked_samples,
    decode_sample,
    sample_range,
)
from mapdet.shards.source import ShardSource, shard_source
from mapdet.structures import Batch


def repeat_factors(manifest: dict, threshold: float) -> dict[int, float]:
    """r(c) = max(1, sqrt(t / f(c))), f(c) = share of training images containing class c (LVIS)."""
    return {c: max(1.0, math.sqrt(threshold / f)) if f > 0 else 1.0 for c, f in class_image_fractions(manifest).items()}


def image_repeat_factor(labels, iscrowd, factors: dict[int, float]) -> float:
    """r(image) = max over the image's (non-crowd) classes; 1 for an image without objects."""
    classes = {int(k) for k, c in zip(labels, iscrowd) if not c}
    return max((factors.get(k, 1.0) for k in classes), default=1.0)


@dataclass
class _TrainPlan:
    source: ShardSource
    names: list[str]  # per shard, as the manifest lists them
    keys: list[list[str]]  # per shard, as the manifest lists them
    batch_size: int
    batches_per_epoch: int
    shuffle_buffer: int
    factors: dict[int, float] | None
    num_classes: int
    seed: int
    rank: int


# Faults in a row (unreadable shards drawn, or samples that fail to decode) after which a worker
# gives up: the data cannot fill a batch however many faults train.max_bad_samples tolerates.
_GIVE_UP = 1000


class _TrainEpoch(IterableDataset):
    """The rest of one epoch of one rank's training stream, after ``skip_batches`` batches."""

    def __init__(self, plan: _TrainPlan, epoch: int, skip_batches: int):
        self.plan, self.epoch, self.skip = plan, epoch, skip_batches

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        p = self.plan
        # Batch b of the epoch belongs to lane b % nw. The DataLoader takes worker 0 first, so
        # after skipping `skip` batches worker w serves lane (w + skip) % nw: the order (and, as
        # each lane's RNG depends only on its position, the content) is that of an unbroken run.
        lane = (wid + self.skip) % nw
        n_batches = len(range(lane, p.batches_per_epoch, nw))
        n_skip = len(range(lane, min(self.skip, p.batches_per_epoch), nw))
        rng = random.Random(f"{p.seed}/{p.rank}/{self.epoch}/{lane}")
        bad: list[dict] = []
        samples = _train_samples(p, rng, bad)
        for _ in range(n_skip * p.batch_size):
            next(samples, None)
        bad.clear()  # counted by the run that trained on these batches
        for _ in range(n_batches - n_skip):
            images, targets = [], []
            while len(images) < p.batch_size:
                sample = next(samples, None)
                if sample is None or len(bad) >= _GIVE_UP:
                    yield fatal_batch(
                        f"no readable training sample in the last {len(bad)} tries "
                        f"(lost per shard: {_lost_per_shard(bad)})"
                    )
                    return
                try:
                    image, target = decode_sample(sample, p.num_classes)
                except CorruptSample as e:
                    bad.append(bad_entry(sample["__url__"], sample["__key__"], str(e)))
                    continue
                keep = target["iscrowd"] == 0
                for k in ("boxes", "labels", "iscrowd"):
                    target[k] = target[k][keep]
                images.append(image)
                targets.append(target)
            yield Batch(images, targets, bad[:])
            bad.clear()


def _lost_per_shard(bad: list[dict]) -> str:
    counts: dict[str, int] = {}
    for b in bad:
        counts[b["shard"]] = counts.get(b["shard"], 0) + b["samples"]
    return ", ".join(f"{s}: {n}" for s, n in sorted(counts.items()))


def _train_samples(p: _TrainPlan, rng: random.Random, bad: list[dict]) -> Iterator[dict]:
    """Endless raw samples: resampled shards -> checked tar members -> repeat-factor copies -> shuffle.

    Ends only when ``_GIVE_UP`` shards in a row yield nothing (every shard unreadable).
    """

    def raw():
        empty = 0
        while empty < _GIVE_UP:
            i = rng.randrange(len(p.names))
            empty += 1
            for sample in checked_samples(p.source, p.names[i], p.keys[i], bad):
                empty = 0
                yield sample

    stream = raw()
    if p.factors:
        stream = repeat_stream(stream, p.factors, rng, bad)
    if p.shuffle_buffer > 1:
        stream = wds.shuffle(p.shuffle_buffer, p.shuffle_buffer, rng=rng)(stream)
    return iter(stream)


def repeat_stream(stream, factors, rng: random.Random, bad: list[dict]):
    for sample in stream:
        try:
            rec = json.loads(sample["json"])
            r = image_repeat_factor(rec["labels"], rec.get("iscrowd", [0] * len(rec["labels"])), factors)
        except Exception:  # leave the verdict to decode_sample, which names the fault
            r = 1.0
        copies = int(r) + (rng.random() < r - int(r))  # stochastic rounding, as in LVIS/detectron2
        for _ in range(copies):
            yield sample


class TrainStream:
    """Endless batches for one rank, epoch after epoch; ``batches_seen`` is the resume position.

    Raises ``CorruptSample`` when the shards cannot fill a batch at all (see ``_GIVE_UP``).
    """

    def __init__(
        self,
        shards: str | Path | ShardSource,
        manifest: dict,
        data_cfg,
        rank: int,
        world: int,
        seed: int,
        start_batch: int = 0,
    ):
        source = shard_source(shards, data_cfg)
        n = int(manifest["num_samples"])
        if n == 0 or not manifest["shards"]:
            raise ValueError(f"the {manifest['split']} split in {source.location} has no samples to train on")
        per_rank = data_cfg.samples_per_epoch or math.ceil(n / world)
        thr = data_cfg.repeat_threshold
        self.plan = _TrainPlan(
            source=source,
            names=[s["name"] for s in manifest["shards"]],
            keys=[s["keys"] for s in manifest["shards"]],
            batch_size=data_cfg.batch_size,
            batches_per_epoch=max(1, per_rank // data_cfg.batch_size),
            shuffle_buffer=data_cfg.shuffle_buffer,
            factors=repeat_factors(manifest, thr) if thr else None,
            num_classes=len(manifest["classes"]),
            seed=seed,
            rank=rank,
        )
        self.workers = data_cfg.workers
        self.batches_seen = start_batch
        self.hint = f"; run `mapdet verify {source.location}` and repack the shards it names"

    def __iter__(self) -> Iterator[Batch]:
        while True:
            epoch, skip = divmod(self.batches_seen, self.plan.batches_per_epoch)
            # batch_loader by this module's name: the pinned-memory patch in bench/bench_train*.py of
            # mapdet.data.loaders.batch_loader must reach these DataLoaders.
            loader = batch_loader(
                _TrainEpoch(self.plan, epoch, skip), self.workers, prefetch_factor=4 if self.workers else None
            )
            for batch in RaiseFatal(loader, self.hint):
                self.batches_seen += 1
                yield batch


def eval_keys(manifest: dict, rank: int, world: int) -> list[str]:
    """The keys rank ``rank`` of ``world`` will evaluate: a contiguous, balanced range."""
    keys = [k for s in manifest["shards"] for k in s["keys"]]
    lo, hi = share(len(keys), rank, world)
    return keys[lo:hi]


class _EvalShare(IterableDataset):
    def __init__(self, source: ShardSource, manifest, rank, world, batch_size, skip_corrupt):
        self.source, self.manifest = source, manifest
        self.rank, self.world, self.batch_size, self.skip_corrupt = rank, world, batch_size, skip_corrupt

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        total = int(self.manifest["num_samples"])
        r_lo, r_hi = share(total, self.rank, self.world)
        w_lo, w_hi = share(r_hi - r_lo, wid, nw)
        lo, hi = r_lo + w_lo, r_lo + w_hi
        images, targets, bad = [], [], []
        try:
            for sample in self._samples(lo, hi, bad if self.skip_corrupt else None):
                try:
                    image, target = decode_sample(sample, len(self.manifest["classes"]))
                except CorruptSample as e:
                    if not self.skip_corrupt:
                        raise
                    bad.append(bad_entry(sample["__url__"], sample["__key__"], str(e)))
                    continue
                images.append(image)
                targets.append(target)
                if len(images) == self.batch_size:
                    yield Batch(images, targets, bad[:])
                    images, targets = [], []
                    bad.clear()
        except CorruptSample as e:
            yield fatal_batch(str(e))
            return
        if images or bad:
            yield Batch(images, targets, bad)

    def _samples(self, lo: int, hi: int, lost: list | None) -> Iterator[dict]:
        start = 0
        for shard in self.manifest["shards"]:
            end = start + shard["num_samples"]
            if start < hi and end > lo:
                yield from sample_range(self.source, shard, max(lo - start, 0), min(hi, end) - start, lost)
            start = end


def eval_loader(
    shards: str | Path | ShardSource,
    manifest: dict,
    batch_size: int,
    workers: int,
    rank: int,
    world: int,
    skip_corrupt: bool = False,
) -> Iterable[Batch]:
    """Rank ``rank``'s exactly-once share of a split, as ``Batch``es (targets keep crowd regions).

    Raises ``CorruptSample`` at the first fault unless ``skip_corrupt``.
    """
    dataset = _EvalShare(shard_source(shards), manifest, rank, world, batch_size, skip_corrupt)
    hint = "" if skip_corrupt else " (eval.skip_corrupt=true leaves such images out and counts them)"
    return RaiseFatal(batch_loader(dataset, workers), hint)
