"""Packer: layout, manifest, COCO file, determinism, resize, resume, multi-job merge, bad input."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mapdet.datasets.vistas import VistasReader
from mapdet.shards import writer
from mapdet.shards.manifest import load_manifest
from mapdet.shards.merge import merge
from mapdet.shards.reader import read_shard
from mapdet.shards.writer import PackOptions, pack
from tests.helpers import pack_all


def _samples(path: Path) -> list[dict]:
    return list(read_shard(path))


def _tars(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.tar"))}


def test_layout_manifest_and_coco_agree_with_the_reader(shards, synth_root):
    m = load_manifest(shards, "training")
    reader = VistasReader(synth_root, "training")
    assert m["num_samples"] == 12 and m["num_inputs"] == 12 and m["skipped"] == []
    assert [s["name"] for s in m["shards"]] == [f"training-{i:06d}.tar" for i in range(3)]
    assert [c["id"] for c in m["classes"]] == list(range(1, len(reader.classes) + 1))
    coco = json.loads((shards / "training.coco.json").read_text())
    assert [a["id"] for a in coco["annotations"]] == list(range(1, len(coco["annotations"]) + 1))
    n_boxes = 0
    for shard in m["shards"]:
        samples = _samples(shards / shard["name"])
        assert [s["__key__"] for s in samples] == shard["keys"]
        for s in samples:
            rec = json.loads(s["json"])
            raw = reader.read(s["__key__"])
            # no resize: the original JPEG bytes, untouched, and the reader's boxes as they are
            assert s["jpg"] == raw.image_path.read_bytes()
            np.testing.assert_array_equal(np.asarray(rec["boxes"]).reshape(-1, 4), raw.boxes)
            assert rec["labels"] == raw.labels.tolist() and rec["iscrowd"] == raw.iscrowd.tolist()
            n_boxes += len(rec["labels"])
    assert n_boxes == len([a for a in coco["annotations"]])
    crowd = sum(a["iscrowd"] for a in coco["annotations"])
    assert m["num_instances"] == n_boxes - crowd
    images_with = {c: set() for c in m["class_stats"]}
    for a in coco["annotations"]:
        if not a["iscrowd"]:
            images_with[str(a["category_id"])].add(a["image_id"])
    assert {c: v["images"] for c, v in m["class_stats"].items()} == {c: len(v) for c, v in images_with.items()}


def test_repack_is_byte_identical(tmp_path, synth_root, shards):
    pack_all(synth_root, tmp_path, "training", workers=2)
    assert _tars(tmp_path) == {k: v for k, v in _tars(shards).items() if k.startswith("training")}
    assert (tmp_path / "training.coco.json").read_bytes() == (shards / "training.coco.json").read_bytes()


def test_max_side_scales_boxes_exactly(tmp_path, synth_root, shards):
    pack_all(synth_root, tmp_path, "validation", max_side=80)
    full = {
        s["__key__"]: json.loads(s["json"])
        for sh in load_manifest(shards, "validation")["shards"]
        for s in _samples(shards / sh["name"])
    }
    for shard in load_manifest(tmp_path, "validation")["shards"]:
        for s in _samples(tmp_path / shard["name"]):
            rec, ref = json.loads(s["json"]), full[s["__key__"]]
            assert (rec["width"], rec["height"]) == (80, 60) == Image.open(io.BytesIO(s["jpg"])).size
            sx, sy = 80 / ref["width"], 60 / ref["height"]
            expected = np.asarray(ref["boxes"]).reshape(-1, 4) * [sx, sy, sx, sy]
            np.testing.assert_allclose(np.asarray(rec["boxes"]).reshape(-1, 4), expected, rtol=0, atol=1e-9)


def test_resume_after_a_crash_redoes_only_unfinished_shards(tmp_path, synth_root, shards, monkeypatch):
    real, calls = writer.pack_shard, []

    def crash_after_first(task):
        if calls:
            raise KeyboardInterrupt("killed")
        calls.append(task[0])
        real(task)

    monkeypatch.setattr(writer, "pack_shard", crash_after_first)
    with pytest.raises(KeyboardInterrupt):
        pack(synth_root, tmp_path, "training", PackOptions(samples_per_shard=4))
    assert not (tmp_path / "training.manifest.json").exists()
    (tmp_path / "training-000001.tar.tmp").write_bytes(b"half a shard")  # a kill mid-write
    monkeypatch.setattr(writer, "pack_shard", real)
    redone = pack(synth_root, tmp_path, "training", PackOptions(samples_per_shard=4))
    assert redone == [1, 2]
    merge(tmp_path, "training")
    assert _tars(tmp_path) == {k: v for k, v in _tars(shards).items() if k.startswith("training")}
    assert not list(tmp_path.glob("*.tmp"))


def test_two_jobs_merge_to_the_single_job_result(tmp_path, synth_root, shards):
    for j in range(2):
        pack(synth_root, tmp_path, "training", PackOptions(samples_per_shard=4, job_index=j, num_jobs=2))
    merged = merge(tmp_path, "training")
    single = load_manifest(shards, "training")
    assert _tars(tmp_path) == {k: v for k, v in _tars(shards).items() if k.startswith("training")}
    assert {k: v for k, v in merged.items() if k != "pack"} == {k: v for k, v in single.items() if k != "pack"}


def test_merge_names_unfinished_shards(tmp_path, synth_root):
    pack(synth_root, tmp_path, "training", PackOptions(samples_per_shard=4, job_index=0, num_jobs=2))
    with pytest.raises(ValueError, match="training-000001.tar"):
        merge(tmp_path, "training")


def test_other_options_into_the_same_folder_are_refused(tmp_path, synth_root):
    pack(synth_root, tmp_path, "validation", PackOptions(samples_per_shard=4))
    with pytest.raises(ValueError, match="different inputs or options"):
        pack(synth_root, tmp_path, "validation", PackOptions(samples_per_shard=4, max_side=64))


def _damage(root: Path, reader: VistasReader):
    """Break four validation images in four ways; returns {stem: expected words in the reason}."""
    stems = reader.stems()
    v = reader.version
    inst = lambda s: root / "validation" / v / "instances" / f"{s}.png"  # noqa: E731
    (root / "validation" / "images" / f"{stems[0]}.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    inst(stems[1]).write_bytes(inst(stems[1]).read_bytes()[:40])
    Image.fromarray(np.zeros((7, 9), np.uint16)).save(inst(stems[2]))
    arr = np.array(Image.open(inst(stems[3])))
    arr[0, 0] = 250 * 256  # label index far beyond the config
    Image.fromarray(arr.astype(np.uint16)).save(inst(stems[3]))
    return stems[:4]


def test_bad_inputs_are_skipped_counted_and_named(copy_root, tmp_path):
    reader = VistasReader(copy_root, "validation", source="instances")
    bad = _damage(copy_root, reader)
    m = pack_all(copy_root, tmp_path, "validation", source="instances")
    skipped = {s["key"]: s["reason"] for s in m["skipped"]}
    assert set(skipped) == set(bad)
    for stem, reason in skipped.items():
        assert stem in reason  # the message names the file
    assert m["num_samples"] == 6 - 4 and m["num_inputs"] == 6
