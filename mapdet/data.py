"""Streaming loaders over packed shards: an endless resampled training stream, an exact-once
evaluation stream, and the sample decoder both share.

Batches are ``Batch(images, targets, bad)``:
- ``images``: list of uint8 tensors (3, H, W), RGB, at stored size (sizes differ within a batch);
- ``targets``: list of dicts: ``boxes`` float32 (N, 4) xyxy pixel-edge in the stored image,
  ``labels`` int64 (N,) in 1..K, ``iscrowd`` int64 (N,), ``image_id`` int, ``key`` str, ``shard`` str.
  An image without objects has boxes (0, 4) and labels (0,). Training targets leave crowd
  regions out (torchvision cannot ignore them; detectron2 does the same);
- ``bad``: samples or shards that failed to read since the previous batch, each
  ``{"shard", "key", "reason"}``, so the training loop can count them (they never vanish silently).

Training (``TrainStream``): each DataLoader worker draws shards with replacement from its own
seeded RNG, optionally repeats images by repeat-factor sampling, shuffles through a buffer and
batches. Every rank yields exactly ``batches_per_epoch`` batches per epoch, so DDP ranks never
wait on each other, and the stream is a pure function of (seed, rank, epoch): a resumed run skips
the batches already consumed (without decoding them) and sees the same data as an unbroken run.

Evaluation (``eval_loader``): the manifest's keys, in shard order, are cut into contiguous ranges,
one per (rank, worker); a worker reads only the shards its range overlaps. Every sample is read
exactly once however many ranks and workers there are (also more than shards), and each rank
knows its keys up front (``eval_keys``).
"""

from __future__ import annotations

import json
import math
import random
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, NamedTuple

import numpy as np
import torch
import torchvision
import webdataset as wds
from webdataset.tariterators import tarfile_samples
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mapdet import boxes as box_ops
from mapdet.manifest import class_image_fractions, shard_urls


class Batch(NamedTuple):
    images: list[torch.Tensor]
    targets: list[dict]
    bad: list[dict]


class CorruptSample(ValueError):
    """A sample that cannot be decoded; the message names the shard and the key."""


def decode_sample(sample: dict, num_classes: int | None = None) -> tuple[torch.Tensor, dict]:
    """One raw webdataset sample (``jpg`` and ``json`` bytes) -> (uint8 (3,H,W), target dict).

    Boxes are clipped to the image and boxes without area or with labels outside 1..K are dropped;
    ``target["sanitized"]`` counts them. Raises ``CorruptSample`` for undecodable data.
    """
    key, shard = sample.get("__key__", "?"), Path(sample.get("__url__", "?")).name
    try:
        rec = json.loads(sample["json"])
        data = torch.frombuffer(bytearray(sample["jpg"]), dtype=torch.uint8)
        image = torchvision.io.decode_jpeg(data, mode=torchvision.io.ImageReadMode.RGB)
        boxes = np.asarray(rec["boxes"], dtype=np.float64).reshape(-1, 4)
        labels = np.asarray(rec["labels"], dtype=np.int64).reshape(-1)
        iscrowd = np.asarray(rec.get("iscrowd", [0] * len(labels)), dtype=np.int64).reshape(-1)
    except Exception as e:  # any decoder or schema failure is the same fault for the caller
        raise CorruptSample(f"{shard}: sample {key!r} does not decode: {type(e).__name__}: {e}") from e
    h, w = image.shape[1:]
    if (rec.get("width"), rec.get("height")) != (w, h) or not len(boxes) == len(labels) == len(iscrowd):
        raise CorruptSample(f"{shard}: sample {key!r} record does not match its image or itself")
    boxes, keep, counts = box_ops.sanitize(boxes, w, h)
    labels, iscrowd = labels[keep], iscrowd[keep]
    in_range = labels >= 1 if num_classes is None else (labels >= 1) & (labels <= num_classes)
    target = {
        "boxes": torch.from_numpy(boxes[in_range]).float().reshape(-1, 4),
        "labels": torch.from_numpy(labels[in_range]),
        "iscrowd": torch.from_numpy(iscrowd[in_range]),
        "image_id": int(rec["image_id"]),
        "key": key,
        "shard": shard,
        "sanitized": counts.clipped + counts.dropped + int((~in_range).sum()),
    }
    return image, target


def repeat_factors(manifest: dict, threshold: float) -> dict[int, float]:
    """r(c) = max(1, sqrt(t / f(c))), f(c) = share of training images containing class c (LVIS)."""
    return {c: max(1.0, math.sqrt(threshold / f)) if f > 0 else 1.0 for c, f in class_image_fractions(manifest).items()}


def image_repeat_factor(labels, iscrowd, factors: dict[int, float]) -> float:
    """r(image) = max over the image's (non-crowd) classes; 1 for an image without objects."""
    classes = {int(k) for k, c in zip(labels, iscrowd) if not c}
    return max((factors.get(k, 1.0) for k in classes), default=1.0)


@dataclass
class _TrainPlan:
    urls: list[str]
    batch_size: int
    batches_per_epoch: int
    shuffle_buffer: int
    factors: dict[int, float] | None
    num_classes: int
    seed: int
    rank: int


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
            next(samples)
        for _ in range(n_batches - n_skip):
            images, targets = [], []
            while len(images) < p.batch_size:
                sample = next(samples)
                try:
                    image, target = decode_sample(sample, p.num_classes)
                except CorruptSample as e:
                    bad.append({"shard": Path(sample.get("__url__", "?")).name, "key": sample.get("__key__"), "reason": str(e)})
                    continue
                keep = target["iscrowd"] == 0
                for k in ("boxes", "labels", "iscrowd"):
                    target[k] = target[k][keep]
                images.append(image)
                targets.append(target)
            yield Batch(images, targets, bad[:])
            bad.clear()


def _train_samples(p: _TrainPlan, rng: random.Random, bad: list[dict]) -> Iterator[dict]:
    """Endless raw samples: resampled shards -> tar members -> repeat-factor copies -> shuffle."""
    current = {"url": "?"}

    def shards():
        while True:
            current["url"] = rng.choice(p.urls)
            yield {"url": current["url"]}

    def on_tar_error(exn: Exception) -> bool:
        bad.append({"shard": Path(current["url"]).name, "key": None, "reason": f"unreadable shard data: {exn}"})
        return True  # keep going: the training loop counts these and stops past a set share

    stream = tarfile_samples(shards(), handler=on_tar_error)
    if p.factors:
        stream = _repeat(stream, p.factors, rng, bad)
    if p.shuffle_buffer > 1:
        stream = wds.shuffle(p.shuffle_buffer, p.shuffle_buffer, rng=rng)(stream)
    return iter(stream)


def _repeat(stream, factors, rng: random.Random, bad: list[dict]):
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
    """Endless batches for one rank, epoch after epoch; ``batches_seen`` is the resume position."""

    def __init__(self, shards_dir: str | Path, manifest: dict, data_cfg, rank: int, world: int, seed: int, start_batch: int = 0):
        n = int(manifest["num_samples"])
        if n == 0 or not manifest["shards"]:
            raise ValueError(f"the {manifest['split']} split in {shards_dir} has no samples to train on")
        per_rank = data_cfg.samples_per_epoch or math.ceil(n / world)
        thr = data_cfg.repeat_threshold
        self.plan = _TrainPlan(
            urls=shard_urls(shards_dir, manifest),
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

    def __iter__(self) -> Iterator[Batch]:
        while True:
            epoch, skip = divmod(self.batches_seen, self.plan.batches_per_epoch)
            # A private generator: DataLoader would otherwise draw its worker seed from the global
            # RNG when the epoch starts, shifting the augmentation RNG of a resumed run.
            loader = DataLoader(_TrainEpoch(self.plan, epoch, skip), batch_size=None, num_workers=self.workers,
                                prefetch_factor=4 if self.workers else None, generator=torch.Generator(),
                                worker_init_fn=_ignore_stop_signals)
            for batch in loader:
                self.batches_seen += 1
                yield batch


def read_shard(path: str | Path, handler=wds.reraise_exception) -> Iterator[dict]:
    """Raw samples of one shard in tar order: ``__key__``, ``__url__``, ``jpg``/``json`` bytes."""
    return iter(tarfile_samples([{"url": str(path)}], handler=handler))


def eval_keys(manifest: dict, rank: int, world: int) -> list[str]:
    """The keys rank ``rank`` of ``world`` will evaluate: a contiguous, balanced range."""
    keys = [k for s in manifest["shards"] for k in s["keys"]]
    lo, hi = _share(len(keys), rank, world)
    return keys[lo:hi]


def _share(n: int, i: int, parts: int) -> tuple[int, int]:
    return n * i // parts, n * (i + 1) // parts


class _EvalShare(IterableDataset):
    def __init__(self, shards_dir, manifest, rank, world, batch_size, skip_corrupt):
        self.urls, self.manifest = shard_urls(shards_dir, manifest), manifest
        self.rank, self.world, self.batch_size, self.skip_corrupt = rank, world, batch_size, skip_corrupt

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        total = int(self.manifest["num_samples"])
        r_lo, r_hi = _share(total, self.rank, self.world)
        w_lo, w_hi = _share(r_hi - r_lo, wid, nw)
        lo, hi = r_lo + w_lo, r_lo + w_hi
        images, targets, bad = [], [], []
        for sample in self._samples(lo, hi):
            try:
                image, target = decode_sample(sample, len(self.manifest["classes"]))
            except CorruptSample as e:
                if not self.skip_corrupt:
                    raise
                bad.append({"shard": Path(sample["__url__"]).name, "key": sample["__key__"], "reason": str(e)})
                continue
            images.append(image)
            targets.append(target)
            if len(images) == self.batch_size:
                yield Batch(images, targets, bad)
                images, targets, bad = [], [], []
        if images or bad:
            yield Batch(images, targets, bad)

    def _samples(self, lo: int, hi: int) -> Iterator[dict]:
        start = 0
        for url, shard in zip(self.urls, self.manifest["shards"]):
            end = start + shard["num_samples"]
            if start < hi and end > lo:
                yield from _shard_range(url, shard, max(lo - start, 0), min(hi, end) - start)
            start = end


def _shard_range(url: str, shard: dict, lo: int, hi: int) -> Iterator[dict]:
    """Samples lo..hi-1 of one shard, checked against the manifest's keys for that position."""
    for i, sample in enumerate(read_shard(url)):
        if i >= hi:
            return
        if i >= lo:
            expected = shard["keys"][i] if i < len(shard["keys"]) else None
            if sample["__key__"] != expected:
                raise CorruptSample(f"{shard['name']}: sample {i} is {sample['__key__']!r}, manifest says {expected!r}")
            yield sample


def eval_loader(shards_dir: str | Path, manifest: dict, batch_size: int, workers: int, rank: int, world: int,
                skip_corrupt: bool = False) -> DataLoader:
    """Rank ``rank``'s exactly-once share of a split, as ``Batch``es (targets keep crowd regions)."""
    dataset = _EvalShare(shards_dir, manifest, rank, world, batch_size, skip_corrupt)
    return DataLoader(dataset, batch_size=None, num_workers=workers, generator=torch.Generator(),  # leaves global RNG alone
                      worker_init_fn=_ignore_stop_signals)


def _ignore_stop_signals(_worker_id: int) -> None:
    """Slurm's SIGTERM (and scancel) reaches every process of the job, DataLoader workers too; a
    worker that died of it would crash the training process before it could checkpoint. The
    training process decides when to stop; workers exit with it (PyTorch watches the parent)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
