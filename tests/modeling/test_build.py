"""mapdet.modeling: archs build, the small preset learns, config validation, class-weighted loss, weights I/O."""

import pytest
import torch
import torchvision
from torchvision.ops import FrozenBatchNorm2d

from mapdet.config import ModelConfig
from mapdet.modeling.build import build_inference_model, build_model, resolve_config
from mapdet.modeling.roi_heads import (
    ClassWeightedRoIHeads,
    SampledRoIHeads,
    class_weights,
    unweighted_loss,
    weighted_classification_loss,
)
from mapdet.modeling.weights_io import export_weights, load_weights_file
from tests.modeling.rectangles import K1, rectangles, small_cfg


def losses_with_seed(model, images, targets, seed=0):
    torch.manual_seed(seed)  # RPN and RoI sampling draw from the global RNG
    model.train()
    return model(images, targets)


@pytest.mark.parametrize("arch", ["small", "mobilenet_v3_large_fpn", "resnet50_fpn_v2"])
def test_arch_builds_and_returns_boxes_in_input_coordinates(arch):
    cfg = ModelConfig(arch=arch, min_size=128, max_size=128, score_thresh=0.0, detections_per_img=7)
    model = build_model(cfg, K1).eval()
    with torch.no_grad():
        out = model([torch.rand(3, 100, 120)])[0]
    assert set(out) == {"boxes", "labels", "scores"}
    assert 0 < len(out["boxes"]) <= 7
    assert out["boxes"][:, [0, 2]].max() <= 120 and out["boxes"][:, [1, 3]].max() <= 100
    assert out["labels"].min() >= 1 and out["labels"].max() < K1


def test_arch_defaults_fill_only_unset_keys():
    cfg = resolve_config(ModelConfig(arch="small", min_size=384))
    assert cfg.min_size == 384 and cfg.max_size == 1024 and cfg.roi_batch_size_per_image == 128
    assert resolve_config(ModelConfig()).min_size == 1024
    with pytest.raises(ValueError, match="model.arch"):
        resolve_config(ModelConfig(arch="resnet18"))


def test_small_preset_loss_falls():
    torch.manual_seed(0)
    model = build_model(small_cfg(), K1)
    images, targets = rectangles(4)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    totals = []
    for step in range(30):
        i = 2 * (step % 2)
        loss = sum(model(images[i : i + 2], targets[i : i + 2]).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        totals.append(loss.item())
    assert sum(totals[-6:]) / 6 < 0.6 * sum(totals[:6]) / 6


def test_empty_targets_train(tmp_path):
    for cfg in (small_cfg(), small_cfg(class_weights="explicit", class_weights_list=[1.0, 2.0, 1.0, 1.0])):
        model = build_model(cfg, K1)
        empty = {"boxes": torch.zeros((0, 4)), "labels": torch.zeros((0,), dtype=torch.int64)}
        images, targets = rectangles(1)
        losses = model([torch.rand(3, 96, 128)] + images, [empty] + targets)
        total = sum(losses.values())
        assert torch.isfinite(total)
        total.backward()


def test_anchor_count_is_checked_against_feature_maps():
    with pytest.raises(ValueError, match="model.anchor_sizes") as err:
        build_model(small_cfg(anchor_sizes=[16, 32, 64]), K1)
    assert "4 feature maps" in str(err.value)
    model = build_model(small_cfg(anchor_sizes=[8, 16, 32, 64], aspect_ratios=[0.5, 1.0, 2.0, 4.0]), K1)
    assert model.rpn.anchor_generator.sizes == ((8,), (16,), (32,), (64,))
    assert model.rpn.head.cls_logits.out_channels == 4
    with pytest.raises(ValueError, match="model.aspect_ratios"):
        build_model(small_cfg(aspect_ratios=[0.0, 1.0]), K1)


def test_detections_per_img_and_sampling_sizes_reach_the_model():
    model = build_model(small_cfg(detections_per_img=3, score_thresh=0.0, roi_batch_size_per_image=32), K1)
    assert model.roi_heads.fg_bg_sampler.batch_size_per_image == 32
    assert build_model(small_cfg(), K1).roi_heads.detections_per_img == 300
    with torch.no_grad():
        out = model.eval()([torch.rand(3, 96, 128)])[0]
    assert len(out["boxes"]) == 3


def test_inv_sqrt_weights():
    cfg = ModelConfig(class_weights="inv_sqrt")
    w = class_weights(cfg, 5, [100, 25, 0, 4])
    # 1/sqrt: 0.1, 0.2, -, 0.5 -> mean over seen classes 0.2667; unseen class and background get 1
    assert torch.allclose(w, torch.tensor([1.0, 0.375, 0.75, 1.0, 1.875]))
    with pytest.raises(ValueError, match="inv_sqrt needs 4"):
        class_weights(cfg, 5, [1, 2, 3])
    assert class_weights(ModelConfig(), 5, [1, 2, 3, 4]) is None


def test_explicit_weights_length_is_checked():
    with pytest.raises(ValueError, match=r"model.class_weights_list: expected 4 values .* got 3"):
        build_model(small_cfg(class_weights="explicit", class_weights_list=[1.0, 1.0, 1.0]), K1)
    with pytest.raises(ValueError, match="model.class_weights_list"):
        build_model(small_cfg(class_weights="explicit"), K1)


def test_unit_weights_give_torchvision_loss_exactly():
    torch.manual_seed(0)
    plain = build_model(small_cfg(), K1)
    weighted = build_model(small_cfg(class_weights="explicit", class_weights_list=[1.0] * K1), K1)
    assert isinstance(weighted.roi_heads, ClassWeightedRoIHeads)
    assert type(plain.roi_heads) is SampledRoIHeads  # torchvision's heads with a batched sampler
    weighted.load_state_dict(plain.state_dict())
    images, targets = rectangles(2)
    ref = losses_with_seed(plain, images, targets)
    got = losses_with_seed(weighted, images, targets)
    assert set(ref) == set(got)
    for key in ref:
        assert torch.equal(ref[key], got[key]), key

    skewed = build_model(small_cfg(class_weights="explicit", class_weights_list=[1.0, 5.0, 0.2, 1.0]), K1)
    skewed.load_state_dict(plain.state_dict())
    other = losses_with_seed(skewed, images, targets)
    assert not torch.equal(other["loss_classifier"], ref["loss_classifier"])
    assert torch.equal(other["loss_box_reg"], ref["loss_box_reg"])


def test_unweighted_loss_gives_torchvision_loss_inside_and_weights_after():
    """The validation loss has one definition: a class-weighted model reports torchvision's plain loss."""
    torch.manual_seed(0)
    plain = build_model(small_cfg(), K1)
    skewed = build_model(small_cfg(class_weights="explicit", class_weights_list=[1.0, 5.0, 0.2, 1.0]), K1)
    skewed.load_state_dict(plain.state_dict())
    images, targets = rectangles(2)
    ref = losses_with_seed(plain, images, targets)
    with unweighted_loss(skewed):
        inside = losses_with_seed(skewed, images, targets)
    after = losses_with_seed(skewed, images, targets)
    for key in ref:
        assert torch.equal(inside[key], ref[key]), key
    assert not torch.equal(after["loss_classifier"], ref["loss_classifier"])  # the weights are back
    with unweighted_loss(plain):  # a model without weighted heads is left as it is
        assert torch.equal(losses_with_seed(plain, images, targets)["loss_classifier"], ref["loss_classifier"])


@pytest.mark.parametrize("class_weights", ["none", "explicit"])
def test_box_loss_weight_scales_the_box_regression_loss_in_training_only(class_weights):
    torch.manual_seed(0)
    extra = {"class_weights_list": [1.0, 5.0, 0.2, 1.0]} if class_weights == "explicit" else {}
    plain = build_model(small_cfg(class_weights=class_weights, **extra), K1)
    loose = build_model(small_cfg(class_weights=class_weights, box_loss_weight=0.25, **extra), K1)
    loose.load_state_dict(plain.state_dict())
    assert loose.roi_heads.box_loss_weight == 0.25 and plain.roi_heads.box_loss_weight == 1.0
    images, targets = rectangles(2)
    ref, got = losses_with_seed(plain, images, targets), losses_with_seed(loose, images, targets)
    assert torch.allclose(got["loss_box_reg"], 0.25 * ref["loss_box_reg"]) and ref["loss_box_reg"] > 0
    for key in ("loss_classifier", "loss_objectness", "loss_rpn_box_reg"):
        assert torch.equal(got[key], ref[key]), key
    with unweighted_loss(loose):  # the validation loss is torchvision's, whatever the weight
        assert torch.equal(losses_with_seed(loose, images, targets)["loss_box_reg"], ref["loss_box_reg"])
    with pytest.raises(ValueError, match=r"model.box_loss_weight=-1.0: must be finite and >= 0"):
        build_model(small_cfg(box_loss_weight=-1.0), K1)


def test_weighted_loss_moves_in_the_expected_direction():
    logits = torch.tensor([[4.0, 0.0, 0.0]] * 4)  # confident background everywhere
    labels = torch.tensor([0, 0, 1, 2])  # two RoIs of real classes are misclassified
    base = weighted_classification_loss(logits, labels, torch.ones(3))
    up = weighted_classification_loss(logits, labels, torch.tensor([1.0, 4.0, 1.0]))
    down = weighted_classification_loss(logits, labels, torch.tensor([1.0, 0.25, 1.0]))
    assert down < base < up
    per_roi = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
    w = torch.tensor([1.0, 1.0, 4.0, 1.0])
    assert torch.allclose(up, (w * per_roi).sum() / w.sum())


def test_weighted_heads_run_under_bf16_autocast():
    model = build_model(small_cfg(class_weights="explicit", class_weights_list=[1.0, 2.0, 1.0, 1.0]), K1)
    images, targets = rectangles(2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = model(images, targets)
    assert all(torch.isfinite(v) for v in losses.values())


def test_missing_weight_files_name_the_key(tmp_path):
    with pytest.raises(FileNotFoundError, match="model.weights"):
        build_model(small_cfg(weights=str(tmp_path / "nope.pth")), K1)
    with pytest.raises(FileNotFoundError, match="model.backbone_weights"):
        build_model(small_cfg(backbone_weights=str(tmp_path / "nope.safetensors")), K1)


def test_export_loads_strictly_into_plain_torchvision_mobilenet():
    cfg = ModelConfig(arch="mobilenet_v3_large_fpn", class_weights="inv_sqrt")
    state = export_weights(build_model(cfg, K1, class_counts=[10, 20, 30]))
    assert all(v.device.type == "cpu" for v in state.values())
    plain = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_fpn(
        weights=None, weights_backbone=None, num_classes=K1
    )
    plain.load_state_dict(state, strict=True)


def test_small_weights_round_trip_through_files(tmp_path):
    torch.manual_seed(0)
    trained = build_model(small_cfg(), K1)
    trained.train()(*rectangles(2))  # moves BatchNorm statistics away from their initial values
    state = export_weights(trained)
    from safetensors.torch import save_file

    save_file(state, str(tmp_path / "w.safetensors"))
    torch.save({"model": state}, tmp_path / "w.pth")
    image = [torch.rand(3, 96, 128)]
    with torch.no_grad():
        ref = trained.eval()(image)[0]["scores"]
        for name in ("w.safetensors", "w.pth"):
            restored = build_model(
                small_cfg(weights=str(tmp_path / name), trainable_backbone_layers=5), K1
            )  # all 5 stages: no frozen BatchNorm
            assert torch.equal(restored.eval()(image)[0]["scores"], ref)
    assert set(load_weights_file(tmp_path / "w.pth")) == set(state)


def test_backbone_weights_load_and_freeze_early_stages(tmp_path):
    source = build_model(small_cfg(), K1)
    with torch.no_grad():
        for p in source.backbone.body.parameters():
            p.add_(0.5)
    body = {f"backbone.body.{k}": v for k, v in source.backbone.body.state_dict().items()}
    torch.save(body, tmp_path / "trunk.pth")
    model = build_model(small_cfg(backbone_weights=str(tmp_path / "trunk.pth")), K1)
    expected = source.backbone.body.state_dict()
    for name, value in model.backbone.body.state_dict().items():
        assert torch.equal(value, expected[name]), name
    children = list(model.backbone.body.children())
    frozen = [c for c in children if not any(p.requires_grad for p in c.parameters())]
    assert 0 < len(frozen) < len(children) and not any(p.requires_grad for p in children[0].parameters())
    assert any(isinstance(m, FrozenBatchNorm2d) for m in children[0].modules())
    assert all(p.requires_grad for p in children[-1].parameters())

    torch.save({"unrelated.weight": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="model.backbone_weights"):
        build_model(small_cfg(backbone_weights=str(tmp_path / "other.pth")), K1)
    with pytest.raises(ValueError, match="model.trainable_backbone_layers"):
        build_model(small_cfg(trainable_backbone_layers=99), K1)


def test_inference_model_ignores_training_only_settings(tmp_path):
    cfg = small_cfg(class_weights="inv_sqrt", weights=str(tmp_path / "later.pth"))
    model = build_inference_model(cfg, K1)  # no manifest counts, no weight file: neither is needed
    assert type(model.roi_heads) is SampledRoIHeads  # no class weights
