"""Where a training run keeps its checkpoints, and how a ``--checkpoint`` value becomes weights.

``RUN/checkpoints/step_0001000/`` is complete once its ``meta.json`` exists (``mapdet.engine.checkpoint``
writes the folder under a ``.tmp`` name and renames it last), so a killed save is never found here.
Reading a checkpoint's weights needs only this module (no optimizer, scheduler or RNG state), which
is why it sits with the model below the training engine: evaluation, prediction and the diagnosis
load trained weights without importing the engine.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from safetensors.torch import load_file

from mapdet.modeling.weights_io import load_weights_file, refuse_pickled_objects

_STEP_DIR = re.compile(r"^step_(\d+)$")


def checkpoints_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints (folder renamed and meta.json present), oldest first."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _STEP_DIR.match(p.name) and (p / "meta.json").exists()]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))


def latest(run_dir: str | Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def resolve(run_dir: str | Path, spec: str | None) -> Path | None:
    """``--resume``/``--checkpoint`` value -> a checkpoint folder: None/"none", "auto"/"latest", or a path."""
    if spec in (None, "none", ""):
        return None
    if spec in ("auto", "latest"):
        found = latest(run_dir)
        if found is None and spec == "latest":
            raise FileNotFoundError(f"no complete checkpoint under {checkpoints_dir(run_dir)}")
        return found
    path = Path(spec)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: give a checkpoint folder, a weights file or latest")
    if not (path / "meta.json").exists():
        raise FileNotFoundError(f"{path} is not a complete mapdet checkpoint (no meta.json)")
    return path


def load_weights(run_dir, spec: str) -> tuple[dict, int]:
    """Model state dict and training step for a ``--checkpoint`` value.

    ``spec``: "latest" (of ``run_dir``), a checkpoint folder, or a plain weights file
    (.safetensors, or .pth read with ``weights_only=True``; step 0).
    """
    if Path(spec).is_file():
        with refuse_pickled_objects(spec):
            return load_weights_file(spec, "--checkpoint"), 0
    found = resolve(run_dir, spec)
    if found is None:
        raise FileNotFoundError(f"no checkpoint under {checkpoints_dir(run_dir)}")
    meta = json.loads((found / "meta.json").read_text())
    return load_file(str(found / "model.safetensors")), int(meta["step"])
