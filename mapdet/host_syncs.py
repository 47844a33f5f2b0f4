"""Which ops of a block make the host wait for the GPU, counted by the source line that ran them,
and ``true_indices``, the sync-free ``torch.where(mask)`` when the count of Trues is known.

On CUDA an op whose result the host must read blocks the host until the GPU has finished everything
queued before it, and the GPU then idles while the host prepares the next ops: ``.item()``,
``bool()``/``float()``/``int()`` of a device tensor (``aten::_local_scalar_dense``), ``nonzero``
(``torch.where(mask)``), indexing with a boolean mask (a ``nonzero`` inside), and torchvision's
``nms`` (it reads its suppression mask back). A detector's training step made about 200 of them per
batch of 8 images; each costs the GPU an idle gap.

``count_host_syncs()`` records them with a ``TorchDispatchMode``, so it works on the CPU too: there
the ops cost nothing, but the same code runs the same ops, so the count is what CUDA would see
(``device_only=True`` keeps only ops on non-CPU tensors: the real syncs on a GPU. On the CPU the
count also holds reads of tensors that stay on the CPU under CUDA too, which are no syncs there:
Kornia's random parameters, the optimizer's step counters). Not seen: ``Tensor.tolist()``/``.cpu()`` (a copy,
not an op of its own on the CPU) and syncs inside C++ kernels other than those above.

    with count_host_syncs() as syncs:
        train_step(...)
    syncs.by_site()  # {"torchvision/models/detection/rpn.py:285 nonzero": 8, ...}
"""

from __future__ import annotations

import collections
import traceback

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_READS = {"_local_scalar_dense", "nonzero", "nms"}
_INDEX = {"index", "index_put_", "_index_put_impl_"}  # a sync only with a boolean mask as index
_OWNERS = ("/torchvision/", "/kornia/", "/torch/optim/", "/mapdet/")  # the innermost of these names the site
_THIS = __file__.replace("\\", "/")


class count_host_syncs(TorchDispatchMode):  # noqa: N801 - used as a context manager, like torch's modes
    def __init__(self, device_only: bool = False):
        super().__init__()
        self.device_only = device_only
        self.sites: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name.split("::")[-1]
        if self._syncs(name, args):
            self.sites[f"{_site()} {name}"] += 1
        return func(*args, **(kwargs or {}))

    def _syncs(self, name: str, args) -> bool:
        if name in _INDEX:
            indices = args[1] if len(args) > 1 and isinstance(args[1], (list, tuple)) else []
            if not any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices):
                return False
            if name != "index" and _fills_a_scalar(indices, args[2]):
                return False  # ``x[mask] = 0``: PyTorch runs it as masked_fill_, no sync
        elif name not in _READS:
            return False
        return not self.device_only or any(isinstance(a, torch.Tensor) and a.device.type != "cpu" for a in args)

    @property
    def total(self) -> int:
        return sum(self.sites.values())

    def by_site(self) -> dict[str, int]:
        return dict(self.sites.most_common())

    def in_file(self, fragment: str) -> int:
        """How many were made by a source file whose path contains ``fragment``."""
        return sum(n for site, n in self.sites.items() if fragment in site.split(":")[0])


def true_indices(mask: torch.Tensor, count: int) -> torch.Tensor:
    """``torch.where(mask)[0]`` for a 1-D bool ``mask`` holding ``count`` True values (known on the
    host), without the sync: a stable partition, Trues first, each element sent to its own slot."""
    seen = mask.cumsum(0)  # Trues up to and including each position
    position = torch.arange(len(mask), device=mask.device)
    slot = torch.where(mask, seen - 1, count + position - seen)  # Falses after the Trues, in order
    order = torch.empty_like(position)
    order[slot] = position  # slots are a permutation: no two writes collide
    return order[:count]


def _fills_a_scalar(indices, value) -> bool:
    """What ATen sends to ``masked_fill_``: one boolean index and a one-element CPU value."""
    return len(indices) == 1 and isinstance(value, torch.Tensor) and value.numel() == 1 and value.device.type == "cpu"


def _site() -> str:
    for frame in reversed(traceback.extract_stack()):
        path = frame.filename.replace("\\", "/")
        if path == _THIS:
            continue
        for owner in _OWNERS:
            if owner in path:
                return owner.strip("/") + "/" + path.split(owner, 1)[1] + f":{frame.lineno}"
    return "elsewhere"
