"""TensorBoard through accelerate's tracker: scalars, the resolved config, images with boxes.

Only the main process writes (accelerate's trackers are no-ops elsewhere), so callers never check
the rank. Events land in ``RUN/tensorboard/``; ``tensorboard --logdir RUN`` shows them.

Tags: ``train/loss`` and ``train/<loss component>``, ``train/lr``, ``train/grad_norm``,
``train/images_per_s``, ``train/step_time_s``, ``train/data_wait``, ``train/skipped_steps``,
``train/bad_samples``, ``train/gpu_mem_gb``; ``val/loss``, ``val/AP``, ``val/AP50``, ...;
images ``train/augmented`` and ``val/predictions``.
"""

from __future__ import annotations

import torch
from torchvision.utils import draw_bounding_boxes

TRACKER = "tensorboard"


def start(accelerator, config_yaml: str, hparams: dict) -> None:
    """Open the run's event file and record the resolved config (text) and flat hparams."""
    flat = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in _flatten(hparams).items()}
    accelerator.init_trackers(TRACKER, config=flat)
    writer = _writer(accelerator)
    if writer is not None:
        writer.add_text("config", "```\n" + config_yaml + "\n```", 0)


def scalars(accelerator, values: dict[str, float], step: int) -> None:
    accelerator.log({k: float(v) for k, v in values.items()}, step=step)


def images_with_boxes(
    accelerator,
    tag: str,
    images,
    boxes_list,
    labels_list,
    names: dict[int, str],
    step: int,
    scores_list=None,
    extra_boxes=None,
) -> None:
    """Draw up to len(images) images side by side in one TensorBoard image.

    ``images``: uint8 or float-in-[0,1] tensors (3, H, W); boxes (N, 4) xyxy pixel-edge in the same
    image. ``extra_boxes``: optional second set per image (e.g. ground truth) drawn in green.
    """
    writer = _writer(accelerator)
    if writer is None or not images:
        return
    for i, image in enumerate(images):
        scores = None if scores_list is None else scores_list[i]
        canvas = draw(image, boxes_list[i], labels_list[i], names, scores, color="red")
        if extra_boxes is not None:
            canvas = draw(canvas, extra_boxes[i], None, names, None, color="lime")
        writer.add_image(f"{tag}/{i}", canvas, step)


def draw(
    image: torch.Tensor, boxes, labels, names: dict[int, str], scores=None, color="red", width: int = 1
) -> torch.Tensor:
    """uint8 (3, H, W) copy of ``image`` with boxes (lines ``width`` pixels) and "name score" captions."""
    if image.dtype != torch.uint8:
        image = (image.detach().float().clamp(0, 1) * 255).to(torch.uint8)
    image = image.cpu()
    boxes = torch.as_tensor(boxes, dtype=torch.float32).cpu().reshape(-1, 4)
    if len(boxes) == 0:
        return image
    captions = None
    if labels is not None:
        labels = torch.as_tensor(labels).cpu().tolist()
        captions = [names.get(int(k), str(k)).split("--")[-1] for k in labels]
        if scores is not None:
            captions = [f"{c} {float(s):.2f}" for c, s in zip(captions, torch.as_tensor(scores).cpu())]
    return draw_bounding_boxes(image, boxes, labels=captions, colors=color, width=width)


def finish(accelerator) -> None:
    accelerator.end_training()  # without it 2 of 6 multi-process runs aborted at exit (notes)


def _writer(accelerator):
    if not accelerator.is_main_process:
        return None
    try:
        return accelerator.get_tracker(TRACKER, unwrap=True)
    except (ValueError, KeyError):
        return None


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out
