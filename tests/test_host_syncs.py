"""mapdet.host_syncs: the ops that would stop the host on CUDA are counted on the CPU too."""

from __future__ import annotations

import pytest
import torch

from mapdet.host_syncs import count_host_syncs, true_indices


def test_reads_back_are_counted_and_fills_are_not():
    x = torch.arange(10.0)
    with count_host_syncs() as syncs:
        float(x.sum())  # _local_scalar_dense
        torch.where(x > 3)  # nonzero
        x[x > 5]  # boolean-mask read: a nonzero inside
        x[x > 8] = 0.0  # masked_fill: no sync
        x[torch.tensor([1, 2])]  # integer index: no sync
        x * 2
    ops = sorted(site.split()[-1] for site, n in syncs.sites.items() for _ in range(n))
    assert ops == ["_local_scalar_dense", "index", "nonzero"]
    assert syncs.total == 3


def test_device_only_ignores_cpu_tensors():
    with count_host_syncs(device_only=True) as syncs:
        float(torch.ones(3).sum())
        torch.where(torch.ones(3) > 0)
    assert syncs.total == 0


def test_sites_name_the_library_line():
    from torchvision.ops import nms

    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [1.0, 1.0, 10.0, 10.0]])
    with count_host_syncs() as syncs:
        nms(boxes, torch.tensor([0.9, 0.8]), 0.5)
    (site,) = syncs.sites
    assert site.startswith("torchvision/") and site.endswith(" nms")
    assert syncs.in_file("torchvision/") == 1 and syncs.in_file("mapdet/") == 0


@pytest.mark.parametrize("share", [0.0, 0.01, 0.5, 1.0])
def test_true_indices_equal_nonzero(share):
    g = torch.Generator().manual_seed(int(share * 100))
    for n in (0, 1, 7, 1000):
        mask = torch.rand(n, generator=g) < share
        assert torch.equal(true_indices(mask, int(mask.sum())), torch.where(mask)[0])
