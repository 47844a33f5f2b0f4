"""Loaders: exactly-once evaluation shares, the resumable training stream, repeat-factor sampling,
and the decoder's handling of empty, out-of-range and corrupt samples."""

from __future__ import annotations

import itertools
import json
import random

import numpy as np
import pytest
import torch

from mapdet.config import DataConfig
from mapdet.data.loaders import TrainStream, eval_keys, eval_loader, image_repeat_factor, repeat_factors, repeat_stream
from mapdet.shards.manifest import load_manifest
from mapdet.shards.reader import CorruptSample, decode_sample


def _eval_seen(shards, ranks: int, workers: int, batch_size: int = 2) -> list[list[str]]:
    m = load_manifest(shards, "validation")
    seen = []
    for r in range(ranks):
        keys = [t["key"] for b in eval_loader(shards, m, batch_size, workers, r, ranks) for t in b.targets]
        assert sorted(keys) == sorted(eval_keys(m, r, ranks))  # each rank knows its share up front
        seen.append(keys)
    return seen


@pytest.mark.parametrize("ranks,workers", [(2, 3), (3, 3), (1, 0)])
def test_eval_stream_reads_every_sample_exactly_once(shards, ranks, workers):
    m = load_manifest(shards, "validation")
    assert len(m["shards"]) == 2 and ranks * max(workers, 1) > len(m["shards"]) or workers == 0
    seen = _eval_seen(shards, ranks, workers)
    flat = [k for keys in seen for k in keys]
    assert sorted(flat) == sorted(k for s in m["shards"] for k in s["keys"])
    assert len(flat) == len(set(flat))
    sizes = [len(k) for k in seen]
    assert max(sizes) - min(sizes) <= 1


def _keys(stream, n):
    return [[t["key"] for t in b.targets] for b in itertools.islice(iter(stream), n)]


def test_train_stream_is_deterministic_epoch_sized_and_resumable(shards):
    m = load_manifest(shards, "training")
    cfg = DataConfig(batch_size=2, workers=2, shuffle_buffer=4, samples_per_epoch=6)
    full = _keys(TrainStream(shards, m, cfg, rank=0, world=2, seed=1), 7)
    assert full == _keys(TrainStream(shards, m, cfg, rank=0, world=2, seed=1), 7)
    assert full != _keys(TrainStream(shards, m, cfg, rank=1, world=2, seed=1), 7)  # ranks differ
    # 3 batches per epoch; resuming at batch 4 (mid-epoch 1) continues the same sequence
    assert _keys(TrainStream(shards, m, cfg, rank=0, world=2, seed=1, start_batch=4), 3) == full[4:7]
    stream = TrainStream(shards, m, cfg, rank=0, world=2, seed=1)
    _keys(stream, 5)
    assert stream.batches_seen == 5


def test_train_batches_are_lists_of_uint8_images_without_crowd(shards):
    m = load_manifest(shards, "training")
    batch = next(iter(TrainStream(shards, m, DataConfig(batch_size=3, workers=0), rank=0, world=1, seed=0)))
    assert len(batch.images) == 3 and batch.bad == []
    for im, t in zip(batch.images, batch.targets):
        assert im.dtype == torch.uint8 and im.shape[0] == 3
        assert t["boxes"].dtype == torch.float32 and t["boxes"].shape == (len(t["labels"]), 4)
        assert t["labels"].dtype == torch.int64 and (t["iscrowd"] == 0).all()


def test_repeat_factor_rates_match_the_formula(shards):
    m = load_manifest(shards, "training")
    factors = repeat_factors(m, threshold=0.9)
    n = max(m["num_samples"], 1)
    for c, stats in m["class_stats"].items():
        f = stats["images"] / n
        assert factors[int(c)] == pytest.approx(max(1.0, (0.9 / f) ** 0.5) if f else 1.0)
    # stochastic rounding: mean copies per image equals r(image) within sampling error
    r = 2.3
    sample = {"json": json.dumps({"labels": [1], "iscrowd": [0]}).encode()}
    rng = random.Random(0)
    copies = [sum(1 for _ in repeat_stream([sample], {1: r}, rng, [])) for _ in range(4000)]
    assert set(copies) == {2, 3}
    assert np.mean(copies) == pytest.approx(r, abs=4 * np.sqrt(0.3 * 0.7 / 4000))
    assert image_repeat_factor([1, 2], [0, 1], {1: 1.5, 2: 9.0}) == 1.5  # crowd classes do not count
    assert image_repeat_factor([], [], {1: 3.0}) == 1.0


def _raw(rec: dict, jpg: bytes) -> dict:
    return {"__key__": "k", "__url__": "/x/s-000000.tar", "jpg": jpg, "json": json.dumps(rec).encode()}


def _jpeg(w=8, h=6) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (w, h), (10, 200, 30)).save(buf, format="JPEG")
    return buf.getvalue()


def test_decode_empty_image_and_sanitised_boxes():
    image, t = decode_sample(
        _raw({"image_id": 1, "width": 8, "height": 6, "boxes": [], "labels": [], "iscrowd": []}, _jpeg())
    )
    assert image.shape == (3, 6, 8) and t["boxes"].shape == (0, 4) and t["labels"].shape == (0,)
    rec = {
        "image_id": 2,
        "width": 8,
        "height": 6,
        "boxes": [[-2, 1, 4, 3], [1, 1, 1, 5], [0, 0, 2, 2]],
        "labels": [1, 1, 7],
        "iscrowd": [0, 0, 0],
    }
    _, t = decode_sample(_raw(rec, _jpeg()), num_classes=3)
    assert t["boxes"].tolist() == [[0, 1, 4, 3]] and t["labels"].tolist() == [1]
    assert t["sanitized"] == 3  # one clipped, one without width, one label outside 1..3


def test_decode_corrupt_sample_names_shard_and_key():
    with pytest.raises(CorruptSample, match=r"s-000000.tar: sample 'k'"):
        decode_sample(
            _raw({"image_id": 1, "width": 8, "height": 6, "boxes": [], "labels": [], "iscrowd": []}, b"garbage")
        )
    with pytest.raises(CorruptSample, match="does not match"):
        decode_sample(_raw({"image_id": 1, "width": 9, "height": 6, "boxes": [], "labels": [], "iscrowd": []}, _jpeg()))
