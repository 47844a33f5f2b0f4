"""validate over predict_everywhere: the numbers of predict itself, and a corrupt sample raised as
CorruptSample with its own message (the input error ``mapdet evaluate`` exits 2 on)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mapdet.config import EvalConfig, ModelConfig
from mapdet.data.loaders import eval_loader
from mapdet.engine.inference import predict
from mapdet.evaluation import validation
from mapdet.modeling.build import build_model
from mapdet.shards.manifest import load_manifest
from mapdet.shards.reader import CorruptSample


@pytest.fixture(scope="module")
def val(shards):
    manifest = load_manifest(shards, "validation")
    gt = json.loads((shards / "validation.coco.json").read_text())
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="small", min_size=128, max_size=160), len(manifest["classes"]) + 1)
    return model.eval(), manifest, gt


def test_detections_and_mean_loss_are_those_of_predict(shards, val):
    model, manifest, gt = val
    cfg = EvalConfig(workers=0, batch_size=4)
    v = validation.validate(model, "cpu", cfg, shards, manifest, gt)
    direct = predict(model, eval_loader(shards, manifest, 4, 0, 0, 1), "cpu", with_loss=True)
    assert v.images == len(direct.keys) == manifest["num_samples"] == 6 and v.left_out == []
    assert np.array_equal(v.detections.to_bytes(), direct.detections.to_bytes())
    assert v.loss == pytest.approx({k: s / 6 for k, s in direct.loss_sum.items()}) and "loss" in v.loss


def test_a_corrupt_sample_is_raised_as_itself(shards, val, monkeypatch):
    def corrupt(*args):
        raise CorruptSample("validation-000001.tar: sample 'k' does not decode")
        yield

    monkeypatch.setattr(validation, "eval_loader", lambda *args: corrupt())
    model, manifest, gt = val
    with pytest.raises(CorruptSample, match="^validation-000001.tar: sample 'k' does not decode$"):
        validation.validate(model, "cpu", EvalConfig(workers=0), shards, manifest, gt)
