"""Pretrained weights by name: torch's cache, offline training, lenient COCO loading, `mapdet weights`.

Every test plants randomly initialised torchvision models of the right arch, saved under the exact
file name of the weights' URL, in a temporary TORCH_HOME; nothing touches the network.
"""

from pathlib import Path

import pytest
import torch
import torchvision
from torchvision.ops import FrozenBatchNorm2d

from mapdet import cli
from mapdet.config import ModelConfig
from mapdet.modeling import pretrained
from mapdet.modeling.build import build_model
from tests.helpers import run_cli

COCO_MNV3 = "torchvision:FasterRCNN_MobileNet_V3_Large_FPN_Weights.COCO_V1"
IMAGENET_MNV3 = "torchvision:MobileNet_V3_Large_Weights.IMAGENET1K_V1"
COCO_R50 = "torchvision:FasterRCNN_ResNet50_FPN_V2_Weights.COCO_V1"
IMAGENET_R50 = "torchvision:ResNet50_Weights.IMAGENET1K_V2"
K1 = 13  # background + 12 classes
PREDICTOR = ("roi_heads.box_predictor.cls_score.", "roi_heads.box_predictor.bbox_pred.")


def mnv3(**kw) -> ModelConfig:
    return ModelConfig(arch="mobilenet_v3_large_fpn", min_size=128, max_size=160, **kw)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """A TORCH_HOME holding a 91-class COCO MobileNetV3 detector and an ImageNet MobileNetV3."""
    home = tmp_path_factory.mktemp("torch_home")
    checkpoints = home / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    torch.manual_seed(123)
    coco = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_fpn(
        weights=None, weights_backbone=None, num_classes=91
    ).state_dict()
    imagenet = torchvision.models.mobilenet_v3_large(weights=None).state_dict()
    with torch.no_grad():  # away from any fresh initialisation, BatchNorm statistics included
        for state in (coco, imagenet):
            for v in state.values():
                if v.is_floating_point():
                    v.add_(0.25)
    torch.save(coco, checkpoints / "fasterrcnn_mobilenet_v3_large_fpn-fb6a3cc7.pth")
    torch.save(imagenet, checkpoints / "mobilenet_v3_large-8738ca79.pth")
    return home, coco, imagenet


@pytest.fixture
def torch_home(planted, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(planted[0]))
    return planted


def test_names_resolve_to_torch_cache_files(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    files = {
        COCO_R50: "fasterrcnn_resnet50_fpn_v2_coco-dd69338a.pth",
        IMAGENET_R50: "resnet50-11ad3fa6.pth",
        COCO_MNV3: "fasterrcnn_mobilenet_v3_large_fpn-fb6a3cc7.pth",
        IMAGENET_MNV3: "mobilenet_v3_large-8738ca79.pth",
    }
    assert set(files) == set(pretrained.NAMES)
    for name, file in files.items():
        member = pretrained.resolve(name)
        assert pretrained.canonical(member) == name
        assert pretrained.cache_path(member) == tmp_path / "hub" / "checkpoints" / file
        assert pretrained.cache_path(member) == Path(torch.hub.get_dir()) / "checkpoints" / file
    assert pretrained.resolve(COCO_R50.removeprefix("torchvision:")) is pretrained.resolve(COCO_R50)
    assert (
        pretrained.is_name(COCO_R50)
        and not pretrained.is_name("/models/torchvision/w.pth")
        and not pretrained.is_name(None)
    )


@pytest.mark.parametrize(
    "name,needle",
    [
        ("torchvision:NoSuch_Weights.COCO_V1", "is not a torchvision weight name"),
        ("torchvision:FasterRCNN_MobileNet_V3_Large_FPN_Weights.COCO_V9", "is not a torchvision weight name"),
        ("torchvision:FasterRCNN_MobileNet_V3_Large_FPN_Weights", "is not a torchvision weight name"),
        ("torchvision:ResNet18_Weights.IMAGENET1K_V1", "is not a weight mapdet can load"),
    ],
)
def test_unknown_name_is_one_line_listing_the_spelling(name, needle, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(ValueError) as e:
        build_model(mnv3(weights=name), K1)
    msg = str(e.value)
    assert msg.startswith(f"model.weights: {name!r} {needle}") and "\n" not in msg
    assert all(n in msg for n in pretrained.NAMES)


def test_name_for_another_arch_or_key_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(ValueError, match="model.weights: .*COCO_V1 is for model.arch=resnet50_fpn_v2, not mobilenet"):
        build_model(mnv3(weights=COCO_R50), K1)
    with pytest.raises(ValueError, match="small preset has no torchvision weights"):
        build_model(ModelConfig(arch="small", backbone_weights=IMAGENET_MNV3), K1)
    with pytest.raises(ValueError, match=f"holds classification weights.*set model.backbone_weights={IMAGENET_MNV3}"):
        build_model(mnv3(weights=IMAGENET_MNV3), K1)


def test_missing_names_stop_with_the_fetch_command(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError) as e:
        build_model(mnv3(weights=COCO_MNV3, backbone_weights=IMAGENET_MNV3), K1)
    msg = str(e.value)
    assert f"mapdet weights fetch {COCO_MNV3} {IMAGENET_MNV3}" in msg and "\n" not in msg
    assert str(tmp_path / "hub" / "checkpoints" / "mobilenet_v3_large-8738ca79.pth") in msg
    assert msg.startswith("model.weights and model.backbone_weights:") and "never downloads" in msg


def test_train_with_a_missing_name_exits_2(shards, tmp_path):
    home = tmp_path / "empty_torch_home"
    r = run_cli(
        "train",
        "--set",
        f"data.shards={shards}",
        f"train.out={tmp_path / 'run'}",
        "model.arch=mobilenet_v3_large_fpn",
        f"model.weights={COCO_MNV3}",
        "data.workers=1",
        env={"TORCH_HOME": str(home), "OMP_NUM_THREADS": "1"},
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    line = [ln for ln in r.stderr.splitlines() if ln.startswith("mapdet train: error:")]
    assert len(line) == 1 and f"run once: mapdet weights fetch {COCO_MNV3} " in line[0], r.stderr
    assert not (home / "hub" / "checkpoints").exists()  # nothing was downloaded, nothing created


def test_coco_detector_loads_into_a_13_class_model(torch_home, capsys):
    _, coco, _ = torch_home
    model = build_model(mnv3(weights=COCO_MNV3, trainable_backbone_layers=6), K1)
    err = capsys.readouterr().err
    state = model.state_dict()
    fresh = [k for k in state if k.startswith(PREDICTOR)]
    kept = [k for k in state if not k.startswith(PREDICTOR) and not k.endswith("num_batches_tracked")]
    assert len(fresh) == 4 and state["roi_heads.box_predictor.cls_score.weight"].shape == (K1, 1024)
    for k in kept:
        assert torch.equal(state[k], coco[k]), k
    assert (
        f"model.weights {COCO_MNV3}: {len(kept)} tensors loaded, 4 kept fresh (class-dependent predictor: "
        f"91 classes in the file, 13 here), 0 skipped"
    ) in err, err

    # Another anchor count per location: the RPN head's two 1x1 convs are skipped, the rest loads.
    model = build_model(mnv3(weights=COCO_MNV3, aspect_ratios=[0.25, 0.5, 1.0, 2.0], trainable_backbone_layers=6), K1)
    err = capsys.readouterr().err
    assert f"{len(kept) - 4} tensors loaded, 4 kept fresh" in err and ", 4 skipped" in err, err
    assert "skipped rpn.head.cls_logits (2 tensors): shape (15, 256, 1, 1) in the file, (20, 256, 1, 1) here" in err
    assert "skipped rpn.head.bbox_pred (2 tensors)" in err
    state = model.state_dict()
    assert torch.equal(state["rpn.head.conv.0.0.weight"], coco["rpn.head.conv.0.0.weight"])

    # Same class count as COCO: the predictor still starts fresh (COCO's classes are not ours).
    model = build_model(mnv3(weights=COCO_MNV3), 91)
    assert not torch.equal(
        model.state_dict()["roi_heads.box_predictor.cls_score.weight"], coco["roi_heads.box_predictor.cls_score.weight"]
    )
    assert "4 kept fresh (class-dependent predictor: 91 classes in the file, 91 here)" in capsys.readouterr().err


def test_backbone_names_load_the_trunk_and_freeze_per_trainable_layers(torch_home):
    _, coco, imagenet = torch_home
    for trainable, n_frozen in ((None, None), (1, None), (6, 0)):
        model = build_model(mnv3(backbone_weights=IMAGENET_MNV3, trainable_backbone_layers=trainable), K1)
        body = model.backbone.body
        for k, v in body.state_dict().items():
            if not k.endswith("num_batches_tracked"):
                assert torch.equal(v, imagenet[f"features.{k}"]), k  # classifier.* ignored
        children = list(body.children())
        frozen = [c for c in children if not any(p.requires_grad for p in c.parameters())]
        if n_frozen == 0:
            assert not frozen and not any(isinstance(m, FrozenBatchNorm2d) for m in body.modules())
            continue
        assert 0 < len(frozen) < len(children) and children[0] in frozen
        assert all(
            isinstance(m, FrozenBatchNorm2d) for c in frozen for m in c.modules() if "BatchNorm" in type(m).__name__
        )
        assert all(p.requires_grad for p in children[-1].parameters())
        if trainable == 1:
            assert len(frozen) == len(children) - 1  # only the last stage (the 1x1 head conv) trains
        else:  # torchvision's default with pretrained weights: 3 trainable stages
            n_frozen_default = len(frozen)
    one = build_model(mnv3(backbone_weights=IMAGENET_MNV3, trainable_backbone_layers=3), K1)
    assert (
        sum(not any(p.requires_grad for p in c.parameters()) for c in one.backbone.body.children()) == n_frozen_default
    )
    # A COCO detector name as model.backbone_weights: its trunk.
    model = build_model(mnv3(backbone_weights=COCO_MNV3), K1)
    for k, v in model.backbone.body.state_dict().items():
        assert torch.equal(v, coco[f"backbone.body.{k}"]), k


def test_local_file_that_mismatches_still_fails_strictly(torch_home):
    path = pretrained.cache_path(pretrained.resolve(COCO_MNV3))
    with pytest.raises(RuntimeError, match="size mismatch for roi_heads.box_predictor.cls_score.weight"):
        build_model(mnv3(weights=str(path)), K1)  # the same file, named by path: today's strict load
    model = build_model(mnv3(weights=str(path)), 91)  # and it loads when it fits
    assert torch.equal(
        model.state_dict()["roi_heads.box_predictor.cls_score.weight"],
        torch_home[1]["roi_heads.box_predictor.cls_score.weight"],
    )


def test_coco_r50_into_the_vistas_anchors(tmp_path, monkeypatch, capsys):
    """The shipped R50 path: anchor sizes 16..256 keep 3 anchors per location, so all but the predictor loads."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    path = pretrained.cache_path(pretrained.resolve(COCO_R50))
    path.parent.mkdir(parents=True)
    coco = torchvision.models.detection.fasterrcnn_resnet50_fpn_v2(
        weights=None, weights_backbone=None, num_classes=91
    ).state_dict()
    torch.save(coco, path)
    cfg = ModelConfig(arch="resnet50_fpn_v2", anchor_sizes=[16, 32, 64, 128, 256], weights=COCO_R50)
    model = build_model(cfg, 71)
    n = sum(not k.startswith(PREDICTOR) and not k.endswith("num_batches_tracked") for k in model.state_dict())
    assert (
        f"{n} tensors loaded, 4 kept fresh (class-dependent predictor: 91 classes in the file, 71 here), 0 skipped"
        in capsys.readouterr().err
    )
    layers = [n for n, c in model.backbone.body.named_children() if not any(p.requires_grad for p in c.parameters())]
    assert layers == ["conv1", "bn1", "relu", "maxpool", "layer1"]  # 3 trainable stages: layer2..layer4


def test_fetch_calls_torchvisions_downloader_with_the_hash_check(tmp_path, monkeypatch, capsys):
    calls = []

    def fake_download(url, model_dir, check_hash, progress):
        calls.append((url, model_dir, check_hash))
        Path(model_dir, Path(url).name).write_bytes(b"weights")

    monkeypatch.setattr(pretrained, "download", fake_download)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "home"))
    with pytest.raises(SystemExit) as e:
        cli.main(["weights", "fetch", COCO_R50, IMAGENET_MNV3])
    assert e.value.code == 0
    cache = tmp_path / "home" / "hub" / "checkpoints"
    assert calls == [
        ("https://download.pytorch.org/models/fasterrcnn_resnet50_fpn_v2_coco-dd69338a.pth", str(cache), True),
        ("https://download.pytorch.org/models/mobilenet_v3_large-8738ca79.pth", str(cache), True),
    ]
    out = capsys.readouterr().out
    assert f"{COCO_R50}: {cache / 'fasterrcnn_resnet50_fpn_v2_coco-dd69338a.pth'}" in out

    calls.clear()
    with pytest.raises(SystemExit) as e:
        cli.main(["weights", "fetch", IMAGENET_R50, "--dir", str(tmp_path / "shared")])
    assert e.value.code == 0 and calls == [
        ("https://download.pytorch.org/models/resnet50-11ad3fa6.pth", str(tmp_path / "shared"), True)
    ]
    capsys.readouterr()

    calls.clear()  # a bad name among good ones: nothing is downloaded, exit 2
    with pytest.raises(SystemExit) as e:
        cli.main(["weights", "fetch", COCO_MNV3, "torchvision:Nope.X"])
    assert (
        e.value.code == 2
        and not calls
        and "'torchvision:Nope.X' is not a torchvision weight name" in capsys.readouterr().err
    )

    with pytest.raises(SystemExit) as e:
        cli.main(["weights", "list"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and all(n in out for n in pretrained.NAMES)
    assert f"{COCO_R50:<64} model.weights (arch resnet50_fpn_v2): in the cache" in out
    assert f"{COCO_MNV3:<64} model.weights (arch mobilenet_v3_large_fpn): missing" in out
