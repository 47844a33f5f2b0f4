"""A folder of images as inference batches: each image exactly once over ranks and loader workers.

``list_images(root)``: the ``.jpg``/``.jpeg``/``.png`` files (any case) under ``root``, searched
recursively, as POSIX paths relative to ``root``, sorted. An image's id is its position in that
list plus one (1..N), so ids are stable for a given folder content whatever the number of
processes or workers.

``shared_listing`` is the same, listed once by the main process and broadcast to every rank.

``image_loader(root, files, ...)``: rank ``rank``'s contiguous share of ``files`` (``comm.share``:
no padding, no repeats), cut again per DataLoader worker, as ``data.Batch``es:

- ``images``: uint8 (3, H, W) RGB at the file's own size: the pixel grid as stored (EXIF
  orientation is not applied, as ``mapdet pack`` does not); grey, palette and RGBA files become RGB,
  16-bit PNGs 8-bit. Sizes differ within a batch (the model resizes each image itself);
- ``targets``: ``{"image_id": int, "key": relative path}`` per image;
- ``bad``: one entry ``{"shard": None, "key": relative path, "reason", "samples": 1}`` per file
  that could not be read or decoded. Such files are counted and named, never silently dropped.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import torch
import torchvision
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torchvision.io import ImageReadMode
from torchvision.transforms.v2.functional import to_dtype

from mapdet import comm
from mapdet.data.workers import batch_loader
from mapdet.structures import Batch

SUFFIXES = (".jpg", ".jpeg", ".png")


def list_images(root: str | Path, exclude: str | Path | None = None) -> list[str]:
    """Relative paths of the images under ``root`` (recursive, sorted); none under ``exclude``.

    ``exclude`` keeps a drawing folder placed inside ``root`` from being read back on a rerun.
    Raises FileNotFoundError for a missing folder and ValueError for a folder without images.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"--images {root}: no such folder")
    skip = Path(exclude).resolve() if exclude is not None else None
    found = sorted(
        p.relative_to(root).as_posix()
        for p in root.rglob("*")
        if p.suffix.lower() in SUFFIXES and p.is_file() and not _under(p, skip)
    )
    if not found:
        raise ValueError(f"--images {root}: no {'/'.join(SUFFIXES)} files in it or its subfolders")
    return found


def shared_listing(root: str | Path, exclude: str | Path | None = None) -> list[str]:
    """Collective ``list_images``: the main process lists, every rank gets its list or its error.

    One listing: ranks listing a folder that changes meanwhile could split two different lists.
    """
    files, error = None, None
    if comm.is_main_process():
        try:
            files = list_images(root, exclude)
        except (ValueError, FileNotFoundError) as e:  # raised on every rank, or the others wait forever
            error = e
    files, error = comm.broadcast_object((files, error))
    if error is not None:
        raise error
    return files


def _under(path: Path, folder: Path | None) -> bool:
    return folder is not None and folder in path.resolve().parents


def read_image(path: str | Path) -> torch.Tensor:
    """uint8 (3, H, W) RGB of one image file; RuntimeError (torchvision's) when it cannot be read."""
    data = torchvision.io.read_file(str(path))
    image = torchvision.io.decode_image(data, mode=ImageReadMode.RGB)
    if image.dtype != torch.uint8:  # a 16-bit PNG
        image = to_dtype(image, torch.uint8, scale=True)
    return image


def _reason(e: Exception) -> str:
    """torchvision's message without its C++ source location (``decode_jpeg, /x/y.cpp:171, ...``)."""
    text = str(e).strip()
    return re.sub(r"^\w+, \S+:\d+, ", "", text.splitlines()[0]) if text else type(e).__name__


class _FolderShare(IterableDataset):
    def __init__(self, root: Path, files: list[str], batch_size: int, rank: int, world: int):
        self.root, self.files, self.batch_size, self.rank, self.world = root, files, batch_size, rank, world

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        r_lo, r_hi = comm.share(len(self.files), self.rank, self.world)
        w_lo, w_hi = comm.share(r_hi - r_lo, wid, nw)
        images, targets, bad = [], [], []
        for index in range(r_lo + w_lo, r_lo + w_hi):
            rel = self.files[index]
            try:
                image = read_image(self.root / rel)
            except (RuntimeError, OSError) as e:
                bad.append({"shard": None, "key": rel, "reason": _reason(e), "samples": 1})
                continue
            images.append(image)
            targets.append({"image_id": index + 1, "key": rel})
            if len(images) == self.batch_size:
                yield Batch(images, targets, bad)
                images, targets, bad = [], [], []
        if images or bad:
            yield Batch(images, targets, bad)


def image_loader(
    root: str | Path, files: list[str], batch_size: int, workers: int, rank: int, world: int
) -> DataLoader:
    """Rank ``rank``'s share of ``files`` (from ``list_images``) as ``Batch``es, decoded in ``workers``
    processes (0: in this one)."""
    return batch_loader(_FolderShare(Path(root), files, batch_size, rank, world), workers)
