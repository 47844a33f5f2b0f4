"""torchvision's pretrained weights, by name, in torch's own cache (``mapdet weights`` fetches them).

``model.weights`` and ``model.backbone_weights`` take a local file or a torchvision weight name
written ``torchvision:ENUM.MEMBER``, e.g.

    torchvision:FasterRCNN_ResNet50_FPN_V2_Weights.COCO_V1          model.weights, arch resnet50_fpn_v2
    torchvision:FasterRCNN_MobileNet_V3_Large_FPN_Weights.COCO_V1   model.weights, arch mobilenet_v3_large_fpn
    torchvision:ResNet50_Weights.IMAGENET1K_V2                      model.backbone_weights, arch resnet50_fpn_v2
    torchvision:MobileNet_V3_Large_Weights.IMAGENET1K_V1            model.backbone_weights, arch mobilenet_v3_large_fpn

(a COCO detector name also works as ``model.backbone_weights``: its trunk is used). A name is read
from ``torch.hub.get_dir()/checkpoints/<file name of the weights' URL>`` ($TORCH_HOME/hub/checkpoints,
default ~/.cache/torch/hub/checkpoints), without re-checking the hash and with
``torch.load(weights_only=True)``. Training never downloads: a name missing from the cache stops it
(exit 2) with the command to run where there is network:

    mapdet weights fetch torchvision:FasterRCNN_ResNet50_FPN_V2_Weights.COCO_V1

``fetch`` downloads into that cache with torchvision's hash check (the hash prefix in the file name)
and prints where each file is; a login node runs it once for a whole cluster that shares TORCH_HOME
(or ``--dir`` writes elsewhere: then point TORCH_HOME at the folder above ``hub/checkpoints``).
A file already in the cache is not downloaded again. ``list`` prints the names above and what is in
the cache.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlparse

PREFIX = "torchvision:"
# weights enum -> (what it holds, the mapdet arch it fits)
SUPPORTED = {
    "FasterRCNN_ResNet50_FPN_V2_Weights": ("detector", "resnet50_fpn_v2"),
    "FasterRCNN_MobileNet_V3_Large_FPN_Weights": ("detector", "mobilenet_v3_large_fpn"),
    "ResNet50_Weights": ("backbone", "resnet50_fpn_v2"),
    "MobileNet_V3_Large_Weights": ("backbone", "mobilenet_v3_large_fpn"),
}
NAMES = (
    "torchvision:FasterRCNN_ResNet50_FPN_V2_Weights.COCO_V1",
    "torchvision:ResNet50_Weights.IMAGENET1K_V2",
    "torchvision:FasterRCNN_MobileNet_V3_Large_FPN_Weights.COCO_V1",
    "torchvision:MobileNet_V3_Large_Weights.IMAGENET1K_V1",
)


def is_name(spec) -> bool:
    """True for a ``torchvision:...`` weight name, False for a local file path."""
    return isinstance(spec, str) and spec.startswith(PREFIX)


def resolve(spec: str, key: str = "weights"):
    """The torchvision ``WeightsEnum`` member of ``torchvision:ENUM.MEMBER`` (the prefix is optional).

    An unknown or unsupported name is a one-line ValueError that lists the names to write."""
    import torchvision

    name = spec[len(PREFIX) :] if spec.startswith(PREFIX) else spec
    try:
        weights = torchvision.models.get_weight(name)
    except (ValueError, KeyError, AttributeError):
        weights = None
    if weights is None or type(weights).__name__ not in SUPPORTED:
        why = "is not a torchvision weight name" if weights is None else "is not a weight mapdet can load"
        raise ValueError(
            f"{key}: {spec!r} {why}; write torchvision:ENUM.MEMBER, one of {', '.join(NAMES)} "
            f"(other members of these enums work too, e.g. torchvision:ResNet50_Weights.DEFAULT)"
        )
    return weights


def canonical(weights) -> str:
    return f"{PREFIX}{type(weights).__name__}.{weights.name}"


def kind_and_arch(weights) -> tuple[str, str]:
    """('detector' | 'backbone', the mapdet arch the weights fit)."""
    return SUPPORTED[type(weights).__name__]


def cache_dir(directory: str | Path | None = None) -> Path:
    """``torch.hub.get_dir()/checkpoints`` (follows TORCH_HOME), or ``directory`` when given."""
    import torch

    return Path(directory) if directory else Path(torch.hub.get_dir()) / "checkpoints"


def cache_path(weights, directory: str | Path | None = None) -> Path:
    """Where torchvision's downloader puts (and mapdet reads) these weights."""
    return cache_dir(directory) / os.path.basename(urlparse(weights.url).path)


def fetch_command(specs) -> str:
    return "mapdet weights fetch " + " ".join(specs)


def load_named(spec: str, key: str):
    """(state dict, weights member) of a ``torchvision:`` name, read from the cache; never downloads."""
    from mapdet.modeling.weights_io import load_weights_file  # torch: only when weights are read

    weights = resolve(spec, key)
    path = cache_path(weights)
    if not path.is_file():
        raise FileNotFoundError(_missing_message([spec], key))
    return load_weights_file(path, f"{key} ({spec})"), weights


def _missing_message(specs, key: str) -> str:
    paths = ", ".join(str(cache_path(resolve(s))) for s in specs)
    return (
        f"{key}: {' and '.join(specs)} {'is' if len(specs) == 1 else 'are'} not in torch's cache ({paths}); "
        "training never downloads. Where "
        f"there is network run once: {fetch_command(specs)} (the cache is $TORCH_HOME/hub/checkpoints; "
        f"share it by pointing TORCH_HOME at the same folder)"
    )


def check_cached(weights: str | None, backbone_weights: str | None) -> None:
    """Before anything is built: every name in the config resolves and is in the cache, else one
    FileNotFoundError naming the single fetch command for all of them."""
    pairs = [("model.weights", weights), ("model.backbone_weights", backbone_weights)]
    for key, spec in pairs:
        if is_name(spec):
            resolve(spec, key)
    missing = [(k, s) for k, s in pairs if is_name(s) and not cache_path(resolve(s)).is_file()]
    if missing:
        raise FileNotFoundError(_missing_message([s for _, s in missing], " and ".join(k for k, _ in missing)))


def download(url: str, model_dir: str, check_hash: bool, progress: bool):
    """torchvision's downloader (kept as one attribute so tests can replace it)."""
    import torch

    return torch.hub.load_state_dict_from_url(
        url, model_dir=model_dir, map_location="cpu", progress=progress, check_hash=check_hash, weights_only=True
    )


def fetch(specs, directory: str | Path | None = None) -> list[Path]:
    """Download each name into the cache (hash checked against the URL's prefix); their paths."""
    resolved = [resolve(s, "NAME") for s in specs]  # every name checked before any download
    target = cache_dir(directory)
    target.mkdir(parents=True, exist_ok=True)
    paths = []
    for weights in resolved:
        path = cache_path(weights, target)
        had = path.is_file()
        download(weights.url, model_dir=str(target), check_hash=True, progress=True)
        print(f"{canonical(weights)}: {path}" + (" (already there, not downloaded again)" if had else ""))
        paths.append(path)
    return paths
