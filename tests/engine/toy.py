"""A stand-in for a detector and its training parts, for training-step and training-loop tests on
the CPU: two losses, NaN on demand, and an endless stream of tiny batches."""

from __future__ import annotations

import torch

from mapdet.engine.step import TrainParts
from mapdet.structures import Batch


class Toy(torch.nn.Module):
    """Stands for a detector: a dict of two losses; ``poison`` makes the second one NaN."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
        self.poison = False

    def forward(self, images, targets):
        x = torch.stack([im.mean() for im in images]).mean()
        b = self.w[1] * x * (float("nan") if self.poison else 1.0)
        return {"loss_a": self.w[0] * x, "loss_b": b}


def toy_batches(bad_every: int = 0):
    """Endless batches of two 4x4 images without objects; every ``bad_every``-th lists a corrupt sample."""
    i = 0
    while True:
        i += 1
        bad = (
            [{"shard": "s.tar", "key": f"k{i}", "reason": "test", "samples": 1}]
            if bad_every and i % bad_every == 0
            else []
        )
        images = [torch.full((3, 4, 4), 0.5), torch.full((3, 4, 4), 0.25)]
        target = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64), "sanitized": 0}
        yield Batch(images, [target] * 2, bad)


def toy_parts(accelerator, model: torch.nn.Module | None = None) -> TrainParts:
    """``model`` (a ``Toy``) prepared by ``accelerator`` with SGD and a decaying schedule, no augmentation."""
    model = model or Toy()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1 + s))
    model, optimizer = accelerator.prepare(model, optimizer)
    return TrainParts(
        accelerator, model, model, optimizer, scheduler, augment=lambda images, targets: (images, targets)
    )
