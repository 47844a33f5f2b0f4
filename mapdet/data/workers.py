"""DataLoaders over datasets that yield whole ``mapdet.structures.Batch``es (shards in
``mapdet.data.loaders``, image folders in ``mapdet.data.imagefolder``), and their workers' faults.

``batch_loader`` builds the DataLoader (``batch_size=None``: a worker's item is already a batch)
with workers that ignore the stop signals Slurm sends every process of a job, and that are killed
at interpreter exit instead of waited for. A worker reports a fault the run cannot go on from as a
``fatal_batch``; ``RaiseFatal`` raises it in the main process as ``CorruptSample`` with the worker's
one-line message (an exception raised in a worker would arrive wrapped in its traceback).
"""

from __future__ import annotations

import atexit
import multiprocessing
import multiprocessing.util  # registers its exit handler before ours (see _kill_workers_at_exit)
import os
import signal
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset

from mapdet.shards.reader import CorruptSample
from mapdet.structures import Batch


def fatal_batch(reason: str) -> Batch:
    """A batch that only carries a fault the consumer must raise (see ``RaiseFatal``)."""
    return Batch([], [], [{"shard": None, "key": None, "reason": reason, "samples": 0, "fatal": True}])


class RaiseFatal:
    """Iterates a loader and raises a worker's fatal fault (see ``fatal_batch``) here, as ``CorruptSample``
    with its one-line message: an exception raised in a worker would arrive wrapped in its traceback."""

    def __init__(self, loader: DataLoader, hint: str = ""):
        self.loader, self.hint = loader, hint

    def __iter__(self) -> Iterator[Batch]:
        for batch in self.loader:
            for b in batch.bad:
                if b.get("fatal"):
                    raise CorruptSample(b["reason"] + self.hint)
            yield batch


def batch_loader(dataset: IterableDataset, workers: int, **kwargs) -> DataLoader:
    """A DataLoader over a dataset that yields whole ``Batch``es, with stop-signal-proof workers."""
    if workers:
        _kill_workers_at_exit()
    # A private generator: DataLoader would otherwise draw its worker seed from the global RNG when
    # an epoch starts, shifting the augmentation RNG of a resumed training run.
    return DataLoader(
        dataset,
        batch_size=None,
        num_workers=workers,
        generator=torch.Generator(),
        worker_init_fn=_ignore_stop_signals,
        **kwargs,
    )


def _ignore_stop_signals(_worker_id: int) -> None:
    """Slurm's SIGTERM (and scancel) reaches every process of the job, DataLoader workers too; a
    worker that died of it would crash the training process before it could checkpoint. The
    training process decides when to stop; workers exit with it (PyTorch watches the parent)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)


_exit_hook: list[bool] = []


def _kill_workers_at_exit() -> None:
    """At interpreter exit multiprocessing SIGTERMs its daemonic children (DataLoader workers) and
    waits for them. Ours ignore SIGTERM, so a process ending while a loader is alive (an uncaught
    error keeps it referenced from the traceback, e.g. a collective failing when another rank
    died) would wait forever. This handler runs first (atexit is last in, first out) and kills them."""
    if not _exit_hook:
        atexit.register(_kill_daemon_children)
        _exit_hook.append(True)


def _kill_daemon_children() -> None:
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # PyTorch's handler would call the kill a worker failure
    for child in multiprocessing.active_children():
        if child.daemon:
            os.kill(child.pid, signal.SIGKILL)
