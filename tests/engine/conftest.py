"""Fixtures of the engine tests: accelerate's one-process Accelerator on the CPU."""

from __future__ import annotations

import pytest
from accelerate.state import AcceleratorState

from mapdet import comm


@pytest.fixture
def accelerator():
    AcceleratorState._reset_state(reset_partial_state=True)  # accelerate keeps one state per process
    yield comm.make_accelerator(mixed_precision="no")
    AcceleratorState._reset_state(reset_partial_state=True)
