"""Tiny detection data and the small preset for the modeling tests."""

from __future__ import annotations

import torch

from mapdet.config import ModelConfig

K1 = 4  # background + 3 classes
COLOURS = torch.tensor([[0.9, 0.1, 0.1], [0.1, 0.9, 0.1], [0.1, 0.1, 0.9]])


def small_cfg(**kw) -> ModelConfig:
    base = dict(arch="small", min_size=128, max_size=160)
    return ModelConfig(**{**base, **kw})


def rectangles(n: int, seed: int = 0, h: int = 96, w: int = 128):
    """Grey images with 1-3 coloured rectangles; the colour is the class."""
    g = torch.Generator().manual_seed(seed)
    images, targets = [], []
    for _ in range(n):
        img = torch.full((3, h, w), 0.5)
        boxes, labels = [], []
        for _ in range(int(torch.randint(1, 4, (1,), generator=g))):
            c = int(torch.randint(0, 3, (1,), generator=g))
            bw, bh = (int(v) for v in torch.randint(12, 40, (2,), generator=g))
            x, y = int(torch.randint(0, w - bw, (1,), generator=g)), int(torch.randint(0, h - bh, (1,), generator=g))
            img[:, y : y + bh, x : x + bw] = COLOURS[c][:, None, None]
            boxes.append([x, y, x + bw, y + bh])
            labels.append(c + 1)
        images.append(img)
        targets.append({"boxes": torch.tensor(boxes, dtype=torch.float32), "labels": torch.tensor(labels)})
    return images, targets
