"""mapdet.modeling.detector.Detector: torchvision's pipeline, its target checks made once per batch."""

from __future__ import annotations

import pytest
import torch

from mapdet.host_syncs import count_host_syncs
from mapdet.modeling.build import build_model
from tests.modeling.rectangles import K1, rectangles, small_cfg


def test_a_degenerate_box_is_named_with_its_image():
    model = build_model(small_cfg(), K1).train()
    images, targets = rectangles(3, seed=2)
    targets[2]["boxes"][0, 2] = targets[2]["boxes"][0, 0]  # zero width
    with pytest.raises(ValueError, match=r"positive height and width.*for target at index 2"):
        model(images, targets)


def test_training_needs_well_shaped_targets():
    model = build_model(small_cfg(), K1).train()
    images, targets = rectangles(2)
    with pytest.raises(ValueError, match="targets are needed"):
        model(images)
    targets[1]["boxes"] = targets[1]["boxes"][:, :3]
    with pytest.raises(ValueError, match=r"shape \[N, 4\]"):
        model(images, targets)


def test_the_batch_is_checked_with_one_read_back_and_images_without_boxes_pass():
    model = build_model(small_cfg(), K1).train()
    images, targets = rectangles(4, seed=5)
    targets[1] = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
    with count_host_syncs() as syncs:
        losses = model(images, targets)
    assert syncs.in_file("mapdet/modeling/detector.py") == 1
    assert all(torch.isfinite(v) for v in losses.values())
