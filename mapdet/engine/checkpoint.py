"""Training checkpoints: atomic, pruned, resumable, and never unpickled as arbitrary objects.

Layout of ``RUN/checkpoints/step_0001000/``::

    model.safetensors        weights of the unwrapped model (safetensors: no pickle at all)
    optimizer.pt, scheduler.pt, scaler.pt   state dicts (tensors and numbers; loaded weights_only=True)
    rng_rank{r}.pt           per-rank RNG states (torch, CUDA), loaded weights_only=True
    rng_rank{r}.json         per-rank Python and NumPy RNG states as plain JSON
    meta.json                step, batches consumed per rank, counters; written LAST

A checkpoint is written into ``step_N.tmp`` and renamed to ``step_N`` only after every rank has
written its files and the main process its ``meta.json``. A kill at any moment therefore leaves
either a complete ``step_N`` or a ``.tmp`` folder that ``mapdet.modeling.run_weights.latest``
ignores (and the next save removes), so the previous checkpoint stays usable. A ``.pt`` file
holding pickled objects (code that would run on load) is refused with a ``ValueError`` naming it.
Finding checkpoints and reading their weights is ``mapdet.modeling.run_weights``'s: evaluation,
prediction and the diagnosis need it without the training engine.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from mapdet import comm
from mapdet.fileio import write_json_atomic
from mapdet.modeling.run_weights import checkpoints_dir, list_checkpoints
from mapdet.modeling.weights_io import refuse_pickled_objects


def save(run_dir, step: int, model, optimizer, scheduler, scaler, meta: dict, keep_last: int) -> Path:
    """Collective: every rank calls it. ``model`` is the unwrapped model. Returns the folder."""
    final = checkpoints_dir(run_dir) / f"step_{step:07d}"
    tmp = final.with_name(final.name + ".tmp")
    if comm.is_main_process():
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    comm.barrier()
    rank = comm.get_rank()
    _save_rng(tmp, rank)
    if comm.is_main_process():
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / "model.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        if scaler is not None:
            torch.save(scaler.state_dict(), tmp / "scaler.pt")
    comm.barrier()
    if comm.is_main_process():
        write_json_atomic(tmp / "meta.json", {"step": step, **meta})
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        _prune(run_dir, keep_last)
    comm.barrier()
    return final


def load(path: Path, model, optimizer=None, scheduler=None, scaler=None) -> dict:
    """Restore what ``save`` wrote (RNG for this rank too); returns meta.json."""
    model.load_state_dict(load_file(str(path / "model.safetensors")))
    for obj, name in ((optimizer, "optimizer.pt"), (scheduler, "scheduler.pt"), (scaler, "scaler.pt")):
        if obj is not None and (path / name).exists():
            with refuse_pickled_objects(path / name):
                obj.load_state_dict(torch.load(path / name, map_location="cpu", weights_only=True))
    rank = comm.get_rank()
    if (path / f"rng_rank{rank}.pt").exists():
        _load_rng(path, rank)
    return json.loads((path / "meta.json").read_text())


def _save_rng(folder: Path, rank: int) -> None:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["cuda"] = torch.cuda.get_rng_state()
    torch.save(tensors, folder / f"rng_rank{rank}.pt")
    np_state = np.random.get_state()
    plain = {
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
    }
    (folder / f"rng_rank{rank}.json").write_text(json.dumps(plain))


def _load_rng(folder: Path, rank: int) -> None:
    with refuse_pickled_objects(folder / f"rng_rank{rank}.pt"):
        tensors = torch.load(folder / f"rng_rank{rank}.pt", map_location="cpu", weights_only=True)
    torch.set_rng_state(tensors["torch"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["cuda"])
    plain = json.loads((folder / f"rng_rank{rank}.json").read_text())
    version, state, gauss = plain["python"]
    random.setstate((version, tuple(state), gauss))
    name, keys, pos, has_gauss, cached = plain["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


def _prune(run_dir, keep_last: int) -> None:
    for old in list_checkpoints(run_dir)[: -max(keep_last, 1)]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in checkpoints_dir(run_dir).glob("step_*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)
