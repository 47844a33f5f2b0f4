"""Batch DataLoaders: a worker's fatal fault raised in the main process with its one-line message,
workers that outlive the stop signals Slurm sends the whole job, and no hang at interpreter exit."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from torch.utils.data import IterableDataset

from mapdet.data.workers import RaiseFatal, batch_loader, fatal_batch
from mapdet.shards.reader import CorruptSample
from mapdet.structures import Batch


class _Items(IterableDataset):
    """Yields one batch per item; ``"fatal"`` becomes a fatal batch, ``"stop"`` signals the worker first."""

    def __init__(self, items):
        self.items = items

    def __iter__(self):
        for item in self.items:
            if item == "fatal":
                yield fatal_batch("shard-3.tar: not a tar archive")
                return
            if item == "stop":
                os.kill(os.getpid(), signal.SIGTERM)
                os.kill(os.getpid(), signal.SIGUSR1)
            yield Batch([torch.zeros(3, 2, 2, dtype=torch.uint8)], [{"key": str(item)}], [])


@pytest.mark.parametrize("workers", [0, 1])
def test_a_fatal_batch_is_raised_after_the_batches_before_it(workers):
    seen = []
    with pytest.raises(CorruptSample) as e:
        for batch in RaiseFatal(batch_loader(_Items(["a", "fatal", "b"]), workers), "; repack it"):
            seen.append(batch.targets[0]["key"])
    assert seen == ["a"]
    assert str(e.value) == "shard-3.tar: not a tar archive; repack it"


def test_workers_ignore_sigterm_and_sigusr1():
    """Without the worker init a SIGTERM kills the worker and the DataLoader raises."""
    keys = [b.targets[0]["key"] for b in batch_loader(_Items(["stop", "after"]), workers=1)]
    assert keys == ["stop", "after"]


def test_a_live_loader_does_not_hang_interpreter_exit():
    """multiprocessing SIGTERMs daemonic children at exit and waits: our workers ignore SIGTERM,
    so they are SIGKILLed first instead."""
    script = textwrap.dedent(
        """
        import itertools, torch
        from torch.utils.data import IterableDataset
        from mapdet.data.workers import batch_loader
        from mapdet.structures import Batch

        class Endless(IterableDataset):
            def __iter__(self):
                for i in itertools.count():
                    yield Batch([torch.zeros(1)], [{"key": str(i)}], [])

        alive = iter(batch_loader(Endless(), workers=2))
        next(alive)
        print("exiting", flush=True)
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "exiting"
