"""What a diagnosis needs besides the ground truth and the detections: the model's configuration,
the per-image detection cap and where it came from, the rare-class threshold and TIDE's thresholds.

One home for the settings that ``mapdet.diagnosis.measures`` (which runs the diagnosis) and
``mapdet.diagnosis.caps`` (which reconciles the cap) both read.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mapdet.config import ModelConfig


@dataclass
class DiagnoseSettings:
    """What the diagnosis needs besides the data; ``cap`` None = ``model.detections_per_img``.

    ``cap_from`` names where the cap comes from (``--detections-per-img``, the config); None with
    ``cap`` None means nobody gave one (the config default stands in): the cap the results show,
    when they show one, is then used without a note.
    """

    model: ModelConfig = field(default_factory=ModelConfig)
    cap: int | None = None
    cap_from: str | None = None
    repeat_threshold: float = 0.1  # t of r(c) = max(1, sqrt(t / f(c))); also the "rare" cut-off
    pos_thr: float = 0.5
    bkg_thr: float = 0.1
    tide_max_dets: int = 100
    progress: bool = False
