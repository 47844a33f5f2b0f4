"""`mapdet predict`: shards equal evaluate's detections.json, a folder of any sizes equals direct model
calls in original pixels, export = checkpoint, 2 processes = 1 process, drawings, bad inputs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mapdet import boxes
from mapdet.config import load_config
from mapdet.drawing import output_names
from mapdet.modeling.build import build_inference_model
from tests.helpers import accelerate_launch, mapdet, random_run

SIZES = {"a.png": (160, 120), "sub/b.png": (320, 240), "sub/c.png": (90, 200), "wide.jpg": (400, 100)}


@pytest.fixture(scope="module")
def run(tmp_path_factory, shards) -> Path:
    """A run folder as `mapdet train` leaves it (config.yaml, checkpoints/step_N, export/), random weights."""
    return random_run(tmp_path_factory.mktemp("predict") / "run", shards)


@pytest.fixture(scope="module")
def images(tmp_path_factory, synth_root) -> Path:
    """Synthetic street scenes at several sizes, PNG and JPEG, one in a subfolder."""
    folder = tmp_path_factory.mktemp("images")
    sources = sorted((synth_root / "validation" / "images").glob("*.jpg"))
    for (name, size), src in zip(SIZES.items(), sources):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.open(src).convert("RGB").resize(size, Image.Resampling.BILINEAR).save(folder / name)
    return folder


def results(path: Path) -> list[dict]:
    return json.loads(Path(path).read_text())


def test_shards_equal_evaluate_detections(run, shards, tmp_path, capsys):
    code, _, err = mapdet(
        capsys,
        "evaluate",
        "--config",
        run / "config.yaml",
        "--checkpoint",
        "latest",
        "--out",
        tmp_path / "eval",
        "--set",
        "eval.val_loss=false",
        "eval.num_images_logged=0",
        "eval.workers=0",
    )
    assert code == 0, err
    code, out, err = mapdet(
        capsys, "predict", "--checkpoint", run, "--shards", shards, "--out", tmp_path / "p.json", "--workers", "0"
    )
    assert code == 0, err
    evaluated = results(tmp_path / "eval" / "detections.json")
    assert evaluated and "file_name" not in evaluated[0]
    predicted = results(tmp_path / "p.json")
    assert [r["image_id"] for r in predicted] == sorted(r["image_id"] for r in evaluated)  # sorted by image
    canonical = lambda rs: sorted(rs, key=lambda r: (r["image_id"], -r["score"], r["category_id"], r["bbox"]))  # noqa: E731
    assert canonical(predicted) == canonical(evaluated)
    assert f"6 image(s) on 1 process(es), {len(evaluated)} detection(s)" in out

    # the same shards through a pipe: command (as from object storage): the same files
    piped = f"pipe:cat {shards}/{{name}}"
    code, _, err = mapdet(
        capsys, "predict", "--checkpoint", run, "--shards", piped, "--out", tmp_path / "piped.json", "--workers", "0"
    )
    assert code == 0 and results(tmp_path / "piped.json") == predicted, err
    evaluate = ["evaluate", "--config", run / "config.yaml", "--checkpoint", "latest", "--out", tmp_path / "eval_piped"]
    overrides = ["eval.val_loss=false", "eval.num_images_logged=0", "eval.workers=0", f"data.shards={piped}"]
    code, _, err = mapdet(capsys, *evaluate, "--set", *overrides)
    assert code == 0, err
    for name in ("detections.json", "metrics.json"):
        assert (tmp_path / "eval_piped" / name).read_bytes() == (tmp_path / "eval" / name).read_bytes(), name


def test_folder_of_any_sizes_in_original_pixels_and_export_equals_checkpoint(run, images, tmp_path, capsys):
    # batches of one: images of different sizes batched together share padding, which moves scores a little
    code, _, err = mapdet(
        capsys,
        "predict",
        "--weights",
        run / "export" / "model.safetensors",
        "--images",
        images,
        "--out",
        tmp_path / "w.json",
        "--workers",
        "0",
        "--batch-size",
        "1",
    )
    assert code == 0, err
    code, _, err = mapdet(
        capsys,
        "predict",
        "--checkpoint",
        run / "checkpoints" / "step_0000007",
        "--images",
        images,
        "--out",
        tmp_path / "c.json",
        "--workers",
        "0",
        "--batch-size",
        "1",
    )
    assert code == 0, err
    got = results(tmp_path / "w.json")
    assert got == results(tmp_path / "c.json")
    files = sorted(SIZES)  # image ids: positions in the sorted relative paths, from 1
    assert {(r["image_id"], r["file_name"]) for r in got} == {(i + 1, f) for i, f in enumerate(files)}

    # the same weights called directly on each image at its own size give the same boxes, in its pixels
    cfg = load_config(run / "config.yaml")
    model = build_inference_model(cfg.model, len(json.loads((run / "export/classes.json").read_text())["classes"]) + 1)
    model.load_state_dict(_export_state(run))
    model.eval()
    for i, name in enumerate(files):
        pixels = torch.from_numpy(np.array(Image.open(images / name).convert("RGB"))).permute(2, 0, 1)
        with torch.no_grad():
            direct = model([pixels.float() / 255])[0]
        mine = [r for r in got if r["image_id"] == i + 1]
        assert len(mine) == len(direct["scores"]) > 0, name
        xyxy = boxes.xywh_to_xyxy([r["bbox"] for r in mine])
        assert np.allclose(xyxy, direct["boxes"].numpy(), atol=1e-3), name
        assert np.allclose([r["score"] for r in mine], direct["scores"].numpy(), atol=1e-6)
        assert [r["category_id"] for r in mine] == direct["labels"].tolist()
        w, h = SIZES[name]
        assert (xyxy >= 0).all() and (xyxy[:, [0, 2]] <= w).all() and (xyxy[:, [1, 3]] <= h).all()
    wide = boxes.xywh_to_xyxy([r["bbox"] for r in got if r["file_name"] == "wide.jpg"])
    assert wide[:, 2].max() > 160  # beyond the model's own 160-pixel frame: original pixels

    thresh = float(np.median([r["score"] for r in got]))
    code, _, _ = mapdet(
        capsys,
        "predict",
        "--weights",
        run / "export" / "model.safetensors",
        "--images",
        images,
        "--out",
        tmp_path / "t.json",
        "--workers",
        "0",
        "--batch-size",
        "1",
        "--score-thresh",
        thresh,
    )
    kept = results(tmp_path / "t.json")
    assert code == 0 and kept == [r for r in got if r["score"] >= thresh] and 0 < len(kept) < len(got)


def _export_state(run: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run / "export" / "model.safetensors"))


def test_draw_writes_each_image_at_its_size_in_the_chosen_format(run, images, tmp_path, capsys):
    weights = run / "export" / "model.safetensors"
    for fmt, magic in (("png", b"\x89PNG"), ("jpg", b"\xff\xd8\xff")):
        drawn = tmp_path / fmt
        code, out, err = mapdet(
            capsys,
            "predict",
            "--weights",
            weights,
            "--images",
            images,
            "--out",
            tmp_path / "r.json",
            "--workers",
            "0",
            "--draw",
            drawn,
            "--draw-format",
            fmt,
            "--draw-thresh",
            "0.05",
        )
        assert code == 0, err
        written = sorted(p.relative_to(drawn).as_posix() for p in drawn.rglob("*") if p.is_file())
        assert written == sorted(str(Path(n).with_suffix(f".{fmt}")) for n in SIZES)
        for name, size in SIZES.items():
            path = drawn / Path(name).with_suffix(f".{fmt}")
            assert path.read_bytes()[: len(magic)] == magic and Image.open(path).size == size
    # boxes are drawn: the drawn PNG differs from the image where the detections are
    a = np.asarray(Image.open(tmp_path / "png" / "a.png"), dtype=int)
    assert (a != np.asarray(Image.open(images / "a.png"), dtype=int)).any()

    with pytest.raises(ValueError, match="x.jpg, x.png"):  # two images, one drawn name
        output_names(["x.jpg", "x.png", "y.png"], "png", strip_suffix=True)

    # a drawing folder inside the image folder is not read back as input on a rerun
    inside = tmp_path / "inside"
    shutil.copytree(images, inside)
    for _ in range(2):
        code, out, err = mapdet(
            capsys,
            "predict",
            "--weights",
            weights,
            "--images",
            inside,
            "--out",
            tmp_path / "r.json",
            "--workers",
            "0",
            "--draw",
            inside / "drawn",
        )
        assert code == 0 and f"{len(SIZES)} image(s) on 1 process(es)" in out, err


def test_unreadable_images_are_counted_named_and_the_rest_predicted(run, images, tmp_path, capsys):
    folder = tmp_path / "mixed"
    shutil.copytree(images, folder)
    data = (folder / "wide.jpg").read_bytes()
    (folder / "cut.jpg").write_bytes(data[: len(data) // 2])
    (folder / "text.png").write_bytes(b"not an image")
    (folder / "empty.jpeg").write_bytes(b"")
    code, out, err = mapdet(
        capsys,
        "predict",
        "--weights",
        run / "export" / "model.safetensors",
        "--images",
        folder,
        "--out",
        tmp_path / "r.json",
        "--workers",
        "0",
        "--batch-size",
        "2",
    )
    assert code == 1
    assert "3 image(s) could not be read" in err
    for name, why in (("cut.jpg", "truncated"), ("text.png", "Unsupported image"), ("empty.jpeg", "empty")):
        assert any(name in line and why in line for line in err.splitlines()), (name, err)
    assert {r["file_name"] for r in results(tmp_path / "r.json")} == set(SIZES)
    assert f"{len(SIZES)} image(s) on 1 process(es)" in out


def test_bad_arguments_exit_2_with_one_line(run, images, shards, tmp_path, capsys):
    export = tmp_path / "export"
    shutil.copytree(run / "export", export)
    weights = export / "model.safetensors"
    (tmp_path / "empty").mkdir()
    record = json.loads((export / "classes.json").read_text())

    def predict(*args):
        code, _, err = mapdet(capsys, "predict", "--out", tmp_path / "r.json", "--workers", "0", *args)
        assert code != 2 or len(err.strip().splitlines()) == 1, err  # one line saying what to fix
        return code, err

    code, err = predict("--weights", weights, "--images", tmp_path / "empty")
    assert code == 2 and "no .jpg/.jpeg/.png files" in err
    (export / "classes.json").rename(export / "kept.json")
    code, err = predict("--weights", weights, "--images", images)
    assert code == 2 and "no classes file" in err and "--classes" in err
    broken = tmp_path / "broken.json"
    broken.write_text('{"classes": [')
    code, err = predict("--weights", weights, "--classes", broken, "--images", images)
    assert code == 2 and f"classes file {broken} is not valid JSON: " in err
    old = tmp_path / "old.json"  # an export written before the model settings were recorded
    old.write_text(json.dumps({k: v for k, v in record.items() if k != "model"}))
    code, err = predict("--weights", weights, "--classes", old, "--images", images)
    assert code == 2 and "does not record the model settings" in err and "--config" in err
    assert predict("--weights", weights, "--classes", old, "--config", run / "config.yaml", "--images", images)[0] == 0
    fewer = tmp_path / "fewer.json"
    fewer.write_text(json.dumps({**record, "classes": record["classes"][:-1]}))
    code, err = predict("--weights", weights, "--classes", fewer, "--images", images)
    assert code == 2 and "does not fit model.arch=small" in err and "of another shape" in err
    other = tmp_path / "other.json"
    other.write_text(json.dumps({**record, "model": {**record["model"], "aspect_ratios": [0.5, 1.0, 2.0, 4.0]}}))
    code, err = predict("--weights", weights, "--classes", other, "--images", images)
    assert code == 2 and "rpn.head" in err
    renamed = tmp_path / "renamed.json"  # fits the weights, but the shards' labels mean other classes
    renamed.write_text(json.dumps({**record, "classes": [{"id": 1, "name": "other"}, *record["classes"][1:]]}))
    code, err = predict("--weights", weights, "--classes", renamed, "--shards", shards)
    assert code == 2 and "has other classes" in err
    code, err = predict("--checkpoint", tmp_path, "--images", images)
    assert code == 2 and "neither a checkpoint folder" in err


@pytest.mark.slow
def test_two_processes_predict_each_image_once_as_one_process(run, images, tmp_path, capsys):
    folder = tmp_path / "five"
    shutil.copytree(images, folder)
    shutil.copy(images / "a.png", folder / "e.png")  # 5 images: shares of 2 and 3
    weights = run / "export" / "model.safetensors"
    code, _, err = mapdet(
        capsys,
        "predict",
        "--weights",
        weights,
        "--images",
        folder,
        "--out",
        tmp_path / "one.json",
        "--batch-size",
        "1",
        "--workers",
        "0",
    )
    assert code == 0, err
    r = accelerate_launch(
        "predict",
        "--weights",
        str(weights),
        "--images",
        str(folder),
        "--out",
        str(tmp_path / "two.json"),
        "--batch-size",
        "1",
        "--workers",
        "1",
        "--draw",
        str(tmp_path / "drawn"),
        env={"OMP_NUM_THREADS": "1"},
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "5 image(s) on 2 process(es)" in r.stdout
    one, two = results(tmp_path / "one.json"), results(tmp_path / "two.json")
    assert [(d["image_id"], d["file_name"], d["category_id"]) for d in two] == [
        (d["image_id"], d["file_name"], d["category_id"]) for d in one
    ]
    assert {d["image_id"] for d in two} == {1, 2, 3, 4, 5}
    assert np.allclose([d["bbox"] for d in two], [d["bbox"] for d in one], atol=1e-4)
    assert np.allclose([d["score"] for d in two], [d["score"] for d in one], atol=1e-6)
    assert len(list((tmp_path / "drawn").rglob("*.jpg"))) == 5  # each rank drew its own share

    # an error found by the main process alone (it lists the folder) ends every rank, none waits
    (tmp_path / "empty").mkdir()
    r = accelerate_launch(
        "predict",
        "--weights",
        str(weights),
        "--images",
        str(tmp_path / "empty"),
        "--out",
        str(tmp_path / "none.json"),
        env={"OMP_NUM_THREADS": "1"},
        timeout=120,
    )
    assert r.returncode != 0 and "no .jpg/.jpeg/.png files" in r.stderr
