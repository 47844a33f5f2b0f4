"""Reading samples out of packed shards: decoded, checked against the manifest, every fault named.

A shard is a tar of ``KEY.jpg`` + ``KEY.json`` members (``mapdet.shards.writer``). Members are read as
bytes in memory; nothing is ever extracted to disk, so a member name such as ``../x.jpg`` or an
absolute path cannot write anywhere. It can only fail the manifest check below.

Faults are reported as ``bad`` entries ``{"shard", "key", "reason", "samples"}`` (``samples``: how
many samples the fault cost; ``key`` None when no single key is to blame) or raised as
``CorruptSample``, whose message names the shard and the key. Two faults look like success to a
plain tar reader and are caught here: ``tarfile`` stops WITHOUT an error at a damaged header after
the first member (a flipped byte silently truncates the shard), and a renamed or injected member
is just another sample. So every read compares the keys met with the manifest's.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
import torchvision
import webdataset as wds
from webdataset.tariterators import group_by_keys, tar_file_expander

from mapdet import boxes as box_ops
from mapdet.shards.source import ShardSource, shard_source


class CorruptSample(ValueError):
    """A sample or shard that cannot be read; the message names the shard and the key."""


def decode_sample(sample: dict, num_classes: int | None = None) -> tuple[torch.Tensor, dict]:
    """One raw webdataset sample (``jpg`` and ``json`` bytes) -> (uint8 (3,H,W), target dict).

    Target: ``boxes`` float32 (N, 4) xyxy pixel-edge in the stored image, ``labels`` int64 (N,),
    ``iscrowd`` int64 (N,), ``image_id``, ``key``, ``shard``, ``orig_size`` (width, height of the
    image before packing resized it). Boxes are clipped to the image and boxes without area (or
    not finite) or with labels outside 1..K are dropped; ``target["sanitized"]`` counts them.
    Raises ``CorruptSample`` for undecodable data.
    """
    key, shard = sample.get("__key__", "?"), Path(sample.get("__url__", "?")).name
    try:
        rec = json.loads(sample["json"])
        data = torch.frombuffer(bytearray(sample["jpg"]), dtype=torch.uint8)
        image = torchvision.io.decode_jpeg(data, mode=torchvision.io.ImageReadMode.RGB)
        boxes = np.asarray(rec["boxes"], dtype=np.float64).reshape(-1, 4)
        labels = np.asarray(rec["labels"], dtype=np.int64).reshape(-1)
        iscrowd = np.asarray(rec.get("iscrowd", [0] * len(labels)), dtype=np.int64).reshape(-1)
        image_id, size = int(rec["image_id"]), (rec.get("width"), rec.get("height"))
        orig_size = (rec.get("orig_width", size[0]), rec.get("orig_height", size[1]))
    except Exception as e:  # any decoder or schema failure is the same fault for the caller
        raise CorruptSample(f"{shard}: sample {key!r} does not decode: {type(e).__name__}: {e}") from e
    h, w = image.shape[1:]
    if size != (w, h) or not len(boxes) == len(labels) == len(iscrowd):
        raise CorruptSample(f"{shard}: sample {key!r} record does not match its image or itself")
    boxes, keep, counts = box_ops.sanitize(boxes, w, h)
    labels, iscrowd = labels[keep], iscrowd[keep]
    in_range = labels >= 1 if num_classes is None else (labels >= 1) & (labels <= num_classes)
    target = {
        "boxes": torch.from_numpy(boxes[in_range]).float().reshape(-1, 4),
        "labels": torch.from_numpy(labels[in_range]),
        "iscrowd": torch.from_numpy(iscrowd[in_range]),
        "image_id": image_id,
        "key": key,
        "shard": shard,
        "orig_size": orig_size,
        "sanitized": counts.clipped + counts.dropped + int((~in_range).sum()),
    }
    return image, target


def read_shard(shard: str | Path, source: ShardSource | None = None) -> Iterator[dict]:
    """Raw samples of one shard in tar order: ``__key__``, ``__url__``, ``jpg``/``json`` bytes.

    ``shard``: a local path, or with ``source`` the shard's name there (``mapdet.shards.source``:
    a folder, URL or pipe: command; a remote read is retried, then raises ``StreamError``).
    Unchecked: see ``checked_samples`` and ``sample_range`` for reads that trust nothing.
    """
    if source is None:
        source, shard = shard_source(Path(shard).parent), Path(shard).name
    with source.open(str(shard)) as stream:
        yield from tar_samples(stream, source.where(str(shard)))


def tar_samples(stream: BinaryIO, url: str) -> Iterator[dict]:
    """Raw samples of the tar read from ``stream`` (webdataset's tar reader); ``__url__`` = ``url``."""
    files = tar_file_expander([{"url": url, "stream": stream}], handler=wds.reraise_exception)
    return group_by_keys(files, handler=wds.reraise_exception)


def bad_entry(url: str, key: str | None, reason: str, samples: int = 1) -> dict:
    return {"shard": Path(url).name, "key": key, "reason": reason, "samples": samples}


def checked_samples(source: ShardSource, name: str, keys: list[str], bad: list[dict]) -> Iterator[dict]:
    """The samples of one shard whose keys the manifest lists for it, in tar order (training).

    Faults are appended to ``bad`` instead of raised: a member under a key the manifest does not
    list, and the samples lost when the tar cannot be read to its end or ends early.
    """
    expected, n, problem = set(keys), 0, None
    try:
        for sample in read_shard(name, source):
            if sample["__key__"] not in expected:
                bad.append(bad_entry(name, sample["__key__"], "member not listed in the manifest for this shard"))
                continue
            n += 1
            yield sample
    except Exception as e:  # noqa: BLE001 - any tar or stream fault ends this shard; the caller counts it
        problem = f"unreadable shard data after {n} samples: {describe_error(e)}"
    if n < len(keys):
        bad.append(bad_entry(name, None, problem or f"shard ends after {n} of {len(keys)} samples", len(keys) - n))


def sample_range(source: ShardSource, shard: dict, lo: int, hi: int, lost: list | None = None) -> Iterator[dict]:
    """Samples lo..hi-1 of one shard, each checked to carry the key the manifest has at its position
    (evaluation: every image exactly once).

    A shard that cannot be read up to position hi (damaged, truncated, another key at a position)
    raises ``CorruptSample`` naming it and the first key lost; with ``lost`` (a list) every key
    from the fault on is appended there instead, as a bad entry.
    """
    i, problem = 0, None
    try:
        for sample in read_shard(shard["name"], source):
            if i >= hi:
                return
            if sample["__key__"] != shard["keys"][i]:
                problem = f"sample {i} is {sample['__key__']!r}, manifest says {shard['keys'][i]!r}"
                break
            if i >= lo:
                yield sample
            i += 1
    except Exception as e:  # noqa: BLE001 - any tar fault ends the shard here; reported below
        problem = f"unreadable after {i} samples: {describe_error(e)}"
    if i >= hi:
        return
    problem = problem or f"ends after {i} samples, manifest lists {len(shard['keys'])}"
    keys = shard["keys"][max(i, lo) : hi]
    if lost is None:
        raise CorruptSample(f"{shard['name']}: {problem}; {len(keys)} image(s) from key {keys[0]!r} on cannot be read")
    lost.extend(bad_entry(shard["name"], k, f"{shard['name']}: {problem}") for k in keys)


def describe_error(e: Exception) -> str:
    """``ReadError: unexpected end of data``: tar errors carry the stream object in their args, and
    webdataset appends `` @ <stream>`` to the message of an error met inside a member."""
    text = e.args[0] if e.args and isinstance(e.args[0], str) else str(e)
    return f"{type(e).__name__}: {re.sub(r' @ <[^<>]*>$', '', text)}"
