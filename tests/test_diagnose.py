"""`mapdet diagnose` end to end: files written, exit codes, TensorBoard in the run folder."""

from __future__ import annotations

import json

import pytest

from mapdet import cli
from tests.test_diagnosis import detect, manifest, scene


def run_cli(*argv) -> int:
    with pytest.raises(SystemExit) as e:
        cli.main(["diagnose", *map(str, argv)])
    return e.value.code


@pytest.fixture()
def inputs(tmp_path):
    gt, objs = scene(10, lambda i: [1, 2, 3] * 3 + ([4] if i == 1 else []))
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "dt.json").write_text(json.dumps(detect(objs, keep=lambda c: c <= 3).to_coco_results()))
    (tmp_path / "m.json").write_text(json.dumps(manifest({1: 10, 2: 10, 3: 10, 4: 1}, 20)))
    return tmp_path


def test_cli_writes_report_json_and_tensorboard(inputs, capsys):
    from torch.utils.tensorboard import SummaryWriter

    run = inputs / "run"
    w = SummaryWriter(str(run / "tensorboard" / "train"))
    for step, (tl, vl, ap) in enumerate([(2.0, 2.1, 0.05), (1.0, 1.2, 0.1)]):
        for tag, v in (("train/loss", tl), ("val/loss", vl), ("val/AP", ap), ("val/AP50", 2 * ap)):
            w.add_scalar(tag, v, step * 100)
    w.close()
    config = inputs / "cfg.yaml"
    config.write_text("model:\n  detections_per_img: 100\n  anchor_sizes: [8, 16, 32, 64, 128]\n")
    out = inputs / "diag"
    assert run_cli("--gt", inputs / "gt.json", "--results", inputs / "dt.json", "--train-manifest", inputs / "m.json",
                   "--run", run, "--config", config, "--out", out) == 0
    d = json.loads((out / "diagnosis.json").read_text())
    assert d["causes"][0]["cause"] == "class_imbalance"
    assert d["max_dets"]["model_cap"] == 100 and d["size"]["anchor_sizes"] == [8, 16, 32, 64, 128]
    assert d["size"]["anchors_from"] == "config" and d["size"]["model_input"]["min_size"] == 1024  # arch default
    assert d["training_curves"]["missing"] == []
    assert len((out / "report.md").read_text()) > 1000 and (out / "loss_vs_map.png").stat().st_size > 0
    assert list((run / "tensorboard" / "diagnose").glob("events.out.tfevents.*"))
    assert "class_imbalance" in capsys.readouterr().out


def test_cli_fails_with_a_message_on_bad_input(inputs, capsys):
    out = inputs / "diag"
    assert run_cli("--gt", inputs / "missing.json", "--results", inputs / "dt.json", "--out", out) == 2
    assert "ground truth file not found" in capsys.readouterr().err
    (inputs / "bad.json").write_text("[{")
    assert run_cli("--gt", inputs / "gt.json", "--results", inputs / "bad.json", "--out", out) == 2
    assert "not valid JSON" in capsys.readouterr().err
    (inputs / "alien.json").write_text(json.dumps([{"image_id": 999, "category_id": 1, "bbox": [0, 0, 5, 5],
                                                    "score": 0.5}]))
    assert run_cli("--gt", inputs / "gt.json", "--results", inputs / "alien.json", "--out", out) == 2
    assert "999" in capsys.readouterr().err
    assert run_cli("--gt", inputs / "gt.json", "--results", inputs / "dt.json", "--checkpoint", "x", "--out", out) == 2
    assert "needs --config" in capsys.readouterr().err
    assert not out.exists()


def test_cli_with_checkpoint_runs_sweep_and_proposal_recall(tmp_path, shards):
    from safetensors.torch import save_file

    from mapdet.config import load_config
    from mapdet.manifest import coco_path, load_manifest
    from mapdet.model import build_model

    config = tmp_path / "cfg.yaml"
    config.write_text(f"data:\n  shards: {shards}\nmodel:\n  arch: small\n  min_size: 96\n  max_size: 128\n"
                      f"  rpn_post_nms_top_n_test: 50\neval:\n  workers: 0\ntrain:\n  out: {tmp_path / 'run'}\n")
    cfg = load_config(config)
    names = load_manifest(shards, "validation")["classes"]
    torch_state = build_model(cfg.model, len(names) + 1).state_dict()
    save_file({k: v.contiguous() for k, v in torch_state.items()}, str(tmp_path / "w.safetensors"))
    (tmp_path / "dt.json").write_text("[]")
    out = tmp_path / "diag"
    assert run_cli("--gt", coco_path(shards, "validation"), "--results", tmp_path / "dt.json", "--config", config,
                   "--checkpoint", tmp_path / "w.safetensors", "--sweep-nms", 0.5, 0.7, "--sweep-score", 0.05,
                   "--sweep-dets", 10, 100, "--out", out) == 0
    d = json.loads((out / "diagnosis.json").read_text())
    assert d["sweep"]["num_images"] == 6 and d["sweep"]["nms_thresh"] == [0.5, 0.7]
    assert d["sweep"]["current"] == {"nms_thresh": 0.5, "score_thresh": 0.05, "detections_per_img": 300}
    assert d["proposal_recall"]["num_gt"]["all"] > 0
    assert (out / "postprocess_sweep.png").stat().st_size > 0 and (out / "proposal_recall.png").stat().st_size > 0
    assert run_cli("--gt", coco_path(shards, "validation"), "--results", tmp_path / "dt.json", "--config", config,
                   "--checkpoint", "latest", "--out", out) == 2  # no checkpoint in train.out
