"""mapdet: Faster R-CNN on Mapillary Vistas, from raw download to a diagnosed mAP.

Library modules each own one job (vistas reader, synth, packer, data, augment, model, engine,
evaluator, diagnosis, tracking, checkpoint); each command has one wiring module (train, evaluate,
...). ``mapdet.cli`` maps command names to those wiring modules.
"""

__version__ = "0.1.0"
