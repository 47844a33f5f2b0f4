"""What a diagnosis needs besides the ground truth and the detections: the model's configuration
(and the whole config in force, for advice), the per-image detection cap and where it came from,
the rare-class threshold, TIDE's thresholds and the localization reference.

One home for the settings that ``mapdet.diagnosis.measures`` (which runs the diagnosis),
``mapdet.diagnosis.caps`` (which reconciles the cap) and ``mapdet.diagnosis.advice`` read.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mapdet.config import Config, ModelConfig
from mapdet.diagnosis.fixes import LOC_REFERENCE_IOU


@dataclass
class DiagnoseSettings:
    """What the diagnosis needs besides the data; ``cap`` None = ``model.detections_per_img``.

    ``cap_from`` names where the cap comes from (``--detections-per-img``, the config); None with
    ``cap`` None means nobody gave one (the config default stands in): the cap the results show,
    when they show one, is then used without a note. ``config``: the config the results were made
    with (``--config``); None when not given, and then no cause carries ``set`` overrides (advice
    against a config nobody gave could repeat what is already in force).
    """

    model: ModelConfig = field(default_factory=ModelConfig)
    cap: int | None = None
    cap_from: str | None = None
    # t of r(c) = max(1, sqrt(t / f(c))); also the "rare" cut-off. None: none in force, and the
    # diagnosis derives one from the class frequencies (measures.tail_threshold)
    repeat_threshold: float | None = None
    pos_thr: float = 0.5
    bkg_thr: float = 0.1
    tide_max_dets: int = 100
    loc_reference_iou: float = LOC_REFERENCE_IOU
    config: Config | None = None
    progress: bool = False
