"""One image's files read without trusting them: JPEG size and truncation, mask headers, the 16-bit
instance PNG read exactly, and the pixel-edge box of every value of a map."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from mapdet.datasets.sample_files import BadSample, check_mask_header, image_size, read_instance_png, value_boxes


def test_value_boxes_match_brute_force():
    rng = np.random.default_rng(0)
    values = rng.choice([0, 256 + 1, 256 + 2, 700], size=(9, 13), p=[0.7, 0.1, 0.1, 0.1])
    got_values, boxes, areas = value_boxes(values)
    assert got_values.tolist() == sorted(np.unique(values).tolist()) and boxes.dtype == np.float64
    for v, box, area in zip(got_values, boxes, areas):
        ys, xs = np.nonzero(values == v)
        assert box.tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1] and area == len(ys)


def test_image_size_reads_the_header_and_refuses_a_truncated_jpeg(tmp_path):
    path = tmp_path / "a.jpg"
    Image.fromarray(np.full((30, 50, 3), 128, np.uint8)).save(path)
    assert image_size(path) == (50, 30)
    path.write_bytes(path.read_bytes()[:-2])  # the end-of-image marker cut off
    with pytest.raises(BadSample, match="truncated JPEG") as e:
        image_size(path)
    assert str(path) in str(e.value)
    with pytest.raises(BadSample, match="unreadable image"):
        image_size(tmp_path / "missing.jpg")


def test_instance_png_is_read_as_16_bit_values_and_its_size_checked(tmp_path):
    values = np.array([[0, 256 + 1, 65535], [7 * 256 + 2, 7 * 256 + 2, 0]], np.uint16)
    path = tmp_path / "i.png"
    Image.fromarray(values).save(path)
    assert np.array_equal(read_instance_png(path, (3, 2)), values)
    with pytest.raises(BadSample, match="mask is 3x2 but the image is 4x2"):
        check_mask_header(path, (4, 2))
    Image.fromarray((values >> 8).astype(np.uint8)).save(path)
    with pytest.raises(BadSample, match="expected 16-bit"):
        read_instance_png(path, (3, 2))
