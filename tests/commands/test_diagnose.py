"""`mapdet diagnose` end to end: files written, exit codes, TensorBoard in the run folder."""

from __future__ import annotations

import json

import pytest

from mapdet import cli
from tests.diagnosis.scenes import capped_scene, detect, manifest, scene


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
    for step, (tl, vl, ap) in enumerate([(2.0, 2.1, 0.05), (1.0, 1.2, 0.1), (0.8, 1.0, 0.12)]):
        for tag, v in (("train/loss", tl), ("val/loss", vl), ("val/AP", ap), ("val/AP50", 2 * ap), ("train/lr", 0.01)):
            w.add_scalar(tag, v, step * 100)
    w.close()
    config = inputs / "cfg.yaml"
    config.write_text("model:\n  detections_per_img: 100\n  anchor_sizes: [8, 16, 32, 64, 128]\n")
    out = inputs / "diag"
    assert (
        run_cli(
            "--gt",
            inputs / "gt.json",
            "--results",
            inputs / "dt.json",
            "--train-manifest",
            inputs / "m.json",
            "--run",
            run,
            "--config",
            config,
            "--out",
            out,
        )
        == 0
    )
    d = json.loads((out / "diagnosis.json").read_text())
    top = d["causes"][0]
    assert top["cause"] == "class_imbalance" and top["impact"] == pytest.approx(25.0)  # class 4 of 4 never found
    # both off in the config; t = the frequency 2/3 of the 4 classes are below
    assert top["set"] == ["data.repeat_threshold=0.5", "model.class_weights=inv_sqrt"]
    under = next(c for c in d["causes"] if c["cause"] == "under_training")
    assert under["impact"] == pytest.approx(2.0) and under["set"] == ["train.max_steps=180000"]  # 10 -> 12 AP
    assert d["impact_unit"]["metric"] == "COCO AP" and all(c["impact"] >= 0 for c in d["causes"])
    assert d["max_dets"]["model_cap"] == 100 and d["size"]["anchor_sizes"] == [8, 16, 32, 64, 128]
    assert d["size"]["anchors_from"] == "config" and d["size"]["model_input"]["min_size"] == 1024  # arch default
    assert d["training_curves"]["missing"] == []
    assert len((out / "report.md").read_text()) > 1000 and (out / "loss_vs_map.png").stat().st_size > 0
    assert list((run / "tensorboard" / "diagnose").glob("events.out.tfevents.*"))
    printed = capsys.readouterr().out
    assert "class_imbalance" in printed and "--set data.repeat_threshold=0.5 model.class_weights=inv_sqrt" in printed
    assert "Try: `--set data.repeat_threshold=0.5 model.class_weights=inv_sqrt`" in (out / "report.md").read_text()


def test_cli_infers_the_cap_the_results_show_and_reports_a_given_one_that_disagrees(tmp_path, capsys):
    gt, dets = capped_scene()  # 150 objects per image, results kept to 100 per image
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "dt.json").write_text(json.dumps(dets.to_coco_results()))
    files = ("--gt", tmp_path / "gt.json", "--results", tmp_path / "dt.json")
    assert run_cli(*files, "--out", tmp_path / "a") == 0  # no cap given: inferred
    d = json.loads((tmp_path / "a" / "diagnosis.json").read_text())
    md = d["max_dets"]
    assert md["model_cap"] == 100 and md["cap_note"] is None
    assert md["cap_source"].startswith("inferred: 5 of 5 images with detections hold exactly 100 detections")
    assert d["causes"][0]["cause"] == "detection_cap" and d["causes"][0]["impact"] > 30
    assert "inferred" in d["causes"][0]["evidence"]
    assert "detection cap 100: inferred" in capsys.readouterr().out
    text = (tmp_path / "a" / "report.md").read_text()
    assert "Missed objects by cause" in text and "| detection_cap | detection_cap |" in text
    assert [g["group"] for g in d["miss_breakdown"]["groups"]] == [
        "detection_cap",
        "rare_class",
        "small",
        "unexplained",
    ]

    assert run_cli(*files, "--detections-per-img", 300, "--out", tmp_path / "b") == 0
    md = json.loads((tmp_path / "b" / "diagnosis.json").read_text())["max_dets"]
    assert md["model_cap"] == 100 and md["given_cap"] == 300
    assert md["cap_note"].startswith("the given cap (--detections-per-img = 300) disagrees with the results")
    assert "note: the given cap" in capsys.readouterr().out
    assert "**Note:** the given cap" in (tmp_path / "b" / "report.md").read_text()

    config = tmp_path / "cfg.yaml"
    config.write_text("model:\n  detections_per_img: 100\n")
    assert run_cli(*files, "--config", config, "--out", tmp_path / "c") == 0
    md = json.loads((tmp_path / "c" / "diagnosis.json").read_text())["max_dets"]
    assert md["model_cap"] == 100 and md["cap_note"] is None
    assert md["cap_source"].startswith("given: the config's model.detections_per_img = 100, confirmed")


def test_cli_fails_with_a_message_on_bad_input(inputs, capsys):
    out = inputs / "diag"
    assert run_cli("--gt", inputs / "missing.json", "--results", inputs / "dt.json", "--out", out) == 2
    assert "ground truth file not found" in capsys.readouterr().err
    (inputs / "bad.json").write_text("[{")
    assert run_cli("--gt", inputs / "gt.json", "--results", inputs / "bad.json", "--out", out) == 2
    assert "not valid JSON" in capsys.readouterr().err
    (inputs / "alien.json").write_text(
        json.dumps([{"image_id": 999, "category_id": 1, "bbox": [0, 0, 5, 5], "score": 0.5}])
    )
    assert run_cli("--gt", inputs / "gt.json", "--results", inputs / "alien.json", "--out", out) == 2
    assert "999" in capsys.readouterr().err
    assert run_cli("--gt", inputs / "gt.json", "--results", inputs / "dt.json", "--checkpoint", "x", "--out", out) == 2
    assert "needs --config" in capsys.readouterr().err
    assert not out.exists()


def test_cli_names_every_unreadable_input_at_once(inputs, capsys):
    (inputs / "bad.json").write_text("[{")
    argv = ("--gt", inputs / "no_gt.json", "--results", inputs / "bad.json", "--out", inputs / "diag")
    assert run_cli(*argv, "--train-manifest", inputs / "no_manifest.json") == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 3 and lines[0] == f"mapdet diagnose: ground truth file not found: {inputs / 'no_gt.json'}"
    assert lines[1].startswith(f"mapdet diagnose: results file {inputs / 'bad.json'} is not valid JSON: ")
    assert lines[2] == f"mapdet diagnose: training manifest file not found: {inputs / 'no_manifest.json'}"
    assert not (inputs / "diag").exists()


def test_cli_with_checkpoint_runs_sweep_and_proposal_recall(tmp_path, shards):
    from safetensors.torch import save_file

    from mapdet.config import load_config
    from mapdet.modeling.build import build_model
    from mapdet.shards.manifest import coco_path, load_manifest

    config = tmp_path / "cfg.yaml"
    config.write_text(
        f"data:\n  shards: {shards}\nmodel:\n  arch: small\n  min_size: 96\n  max_size: 128\n"
        f"  rpn_post_nms_top_n_test: 50\neval:\n  workers: 0\ntrain:\n  out: {tmp_path / 'run'}\n"
    )
    cfg = load_config(config)
    names = load_manifest(shards, "validation")["classes"]
    torch_state = build_model(cfg.model, len(names) + 1).state_dict()
    save_file({k: v.contiguous() for k, v in torch_state.items()}, str(tmp_path / "w.safetensors"))
    (tmp_path / "dt.json").write_text("[]")
    out = tmp_path / "diag"
    assert (
        run_cli(
            "--gt",
            coco_path(shards, "validation"),
            "--results",
            tmp_path / "dt.json",
            "--config",
            config,
            "--checkpoint",
            tmp_path / "w.safetensors",
            "--sweep-nms",
            0.5,
            0.7,
            "--sweep-score",
            0.05,
            "--sweep-dets",
            10,
            100,
            "--out",
            out,
        )
        == 0
    )
    d = json.loads((out / "diagnosis.json").read_text())
    assert d["sweep"]["num_images"] == 6 and d["sweep"]["nms_thresh"] == [0.5, 0.7]
    assert d["sweep"]["current"] == {"nms_thresh": 0.5, "score_thresh": 0.05, "detections_per_img": 300}
    assert d["proposal_recall"]["num_gt"]["all"] > 0
    assert (out / "postprocess_sweep.png").stat().st_size > 0 and (out / "proposal_recall.png").stat().st_size > 0
    assert (
        run_cli(
            "--gt",
            coco_path(shards, "validation"),
            "--results",
            tmp_path / "dt.json",
            "--config",
            config,
            "--checkpoint",
            "latest",
            "--out",
            out,
        )
        == 2
    )  # no checkpoint in train.out
