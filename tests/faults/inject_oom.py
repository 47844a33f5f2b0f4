"""``mapdet ARGS`` with CUDA running out of memory in one rank's forward of a training step, on the CPU.

Run as a script (``python tests/faults/inject_oom.py train ...``, or under ``accelerate launch``):
rank MAPDET_OOM_RANK raises ``torch.cuda.OutOfMemoryError`` in the forward of its MAPDET_OOM_STEP-th
training micro-batch, inside DDP's forward as a real one would; every other rank trains on.
"""

from __future__ import annotations

import os
import sys

import torch

from mapdet.cli import main
from mapdet.modeling.detector import Detector

_forward = Detector.forward
_calls = 0


def _forward_or_oom(self, images, targets=None):
    global _calls
    if self.training:
        _calls += 1
        if (
            _calls == int(os.environ["MAPDET_OOM_STEP"])
            and os.environ.get("RANK", "0") == os.environ["MAPDET_OOM_RANK"]
        ):
            raise torch.cuda.OutOfMemoryError(
                "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.19 GiB"
            )
    return _forward(self, images, targets)


if __name__ == "__main__":
    Detector.forward = _forward_or_oom
    main(sys.argv[1:])
