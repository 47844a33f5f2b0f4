"""Weights in and out of a detector: state dicts from files (never running pickled code), partial
loads across class sets, and plain CPU exports.

State dicts map torchvision's parameter names to tensors; a detector of K classes has K+1 rows in
``roi_heads.box_predictor.cls_score`` and 4(K+1) in ``bbox_pred`` (the class-dependent tensors).
"""

from __future__ import annotations

import contextlib
import os
import pickle
import sys
from pathlib import Path

import torch
from torch import Tensor, nn

_CLASS_DEPENDENT = ("roi_heads.box_predictor.cls_score.", "roi_heads.box_predictor.bbox_pred.")


def load_detector_partially(model: nn.Module, state: dict[str, Tensor], source: str) -> dict:
    """Load a detector's weights trained on another class set (torchvision's COCO detectors).

    Every tensor of ``model`` whose name and shape are in ``state`` is loaded; the class-dependent
    predictor tensors (``roi_heads.box_predictor.cls_score.*``, ``.bbox_pred.*``) keep their fresh
    initialisation even when the shapes happen to match (the file's classes are not ours); every
    other tensor the file lacks or holds in another shape is skipped (left fresh), grouped by module
    with the reason. BatchNorm's ``num_batches_tracked`` counters are not counted. Prints one summary
    line (plus one per skipped group) to stderr on rank 0 and returns
    ``{"loaded": [...], "fresh": [...], "skipped": {module: (count, reason)}, "unused": [...]}``.
    """
    own = model.state_dict()
    take, fresh, skipped = {}, [], {}
    for name, mine in own.items():
        if name.endswith("num_batches_tracked"):
            continue
        if name.startswith(_CLASS_DEPENDENT):
            fresh.append(name)
            continue
        theirs = state.get(name)
        if theirs is not None and theirs.shape == mine.shape:
            take[name] = theirs
            continue
        group = name.rsplit(".", 1)[0]
        if theirs is None:
            reason = "not in the file"
        else:
            reason = f"shape {tuple(theirs.shape)} in the file, {tuple(mine.shape)} here"
            if group.startswith("rpn.head."):
                reason += " (another anchor count per location: model.aspect_ratios)"
        count, first = skipped.get(group, (0, reason))
        skipped[group] = (count + 1, first)
    unused = [k for k in state if k not in own and not k.endswith("num_batches_tracked")]
    model.load_state_dict(take, strict=False)
    if os.environ.get("RANK", "0") == "0":  # once per job under a launcher, not once per process
        file_classes = state.get("roi_heads.box_predictor.cls_score.weight")
        classes = (
            ""
            if file_classes is None
            else (
                f" (class-dependent predictor: {file_classes.shape[0]} classes in the file, "
                f"{own['roi_heads.box_predictor.cls_score.weight'].shape[0]} here)"
            )
        )
        n_skipped = sum(c for c, _ in skipped.values())
        print(
            f"{source}: {len(take)} tensors loaded, {len(fresh)} kept fresh{classes}, {n_skipped} skipped",
            file=sys.stderr,
        )
        for group, (count, reason) in skipped.items():
            print(f"  skipped {group} ({count} tensor{'s' * (count != 1)}): {reason}", file=sys.stderr)
        if unused:
            print(
                f"  {len(unused)} tensors of the file have no place in this model (first: {unused[:3]})",
                file=sys.stderr,
            )
    return {"loaded": sorted(take), "fresh": fresh, "skipped": skipped, "unused": unused}


def load_weights_file(path: str | Path, key: str = "model.weights") -> dict[str, Tensor]:
    """A state dict from ``.safetensors`` or a ``.pth`` read with ``weights_only=True`` (no pickled code)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{key}: weights file {str(path)!r} does not exist (weights are never "
            f"downloaded; copy the file there or fix {key})"
        )
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    with refuse_pickled_objects(f"{key}: {path}"):  # weights_only refuses code that would run on load
        state = torch.load(path, map_location="cpu", weights_only=True)
    for wrapper in ("model", "state_dict"):  # training checkpoints nest the weights
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{key}: {path} does not hold a state dict of tensors")
    return state


def export_weights(model: nn.Module) -> dict[str, Tensor]:
    """Plain CPU state dict: loads (strict) into ``torchvision.models.detection.<builder>(weights=None,
    num_classes=K+1)`` for a stock arch with stock anchor count, else into ``build_model``."""
    model = getattr(model, "module", model)  # DistributedDataParallel wrapper
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


@contextlib.contextmanager
def refuse_pickled_objects(path):
    """``torch.load(weights_only=True)`` refuses pickled objects with a long UnpicklingError; turn it
    into a one-line ValueError naming the file and the refused class (the CLI prints it, exit 2)."""
    try:
        yield
    except pickle.UnpicklingError as e:
        lines = [ln for ln in str(e).splitlines() if "GLOBAL" in ln]
        if not lines:  # not a pickle at all (truncated, another format, random bytes)
            first = (str(e).splitlines() or ["no detail"])[0]
            raise ValueError(f"{path}: not a weights file torch can read ({first})") from None
        raise ValueError(
            f"{path}: refused to load: it holds pickled objects, not only tensors "
            f"({lines[0].strip() if lines else 'no detail'}); use a .safetensors file or a plain state dict"
        ) from None
