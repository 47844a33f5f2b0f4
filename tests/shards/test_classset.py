"""The official class set: Vistas' evaluated instance classes by default, all of them on request."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from mapdet.commands import pack as pack_cli
from mapdet.datasets.layout import config_path, panoptic_json_path
from mapdet.datasets.synthetic.writer import SynthConfig, config_labels, synthesize
from mapdet.datasets.vistas import VistasReader
from mapdet.shards.manifest import describe, load_manifest
from mapdet.shards.merge import merge
from mapdet.shards.reader import read_shard
from mapdet.shards.writer import PackOptions, pack, plan_path
from tests.helpers import pack_all, run_cli

SKIPPED = "animal--bird"  # written with "evaluate": false, as v2.0 does for its ambiguous sign classes


@pytest.fixture(scope="module", params=["v1.2", "v2.0"])
def raw(request, tmp_path_factory) -> Path:
    cfg = SynthConfig(size=(160, 120), class_shares={SKIPPED: 0.6}, not_evaluated=(SKIPPED,))
    return synthesize(
        tmp_path_factory.mktemp(request.param) / "raw", request.param, n_train=8, n_val=2, seed=3, cfg=cfg
    )


def _version(root: Path) -> str:
    return next(root.glob("config_v*.json")).stem.split("_")[1]


def _skipped_per_image(root: Path) -> dict[str, int]:
    """Segments of the not-evaluated class per image stem, from the panoptic JSON."""
    version = _version(root)
    labels = json.loads(config_path(root, version).read_text())["labels"]
    cat = [i + 1 for i, lab in enumerate(labels) if lab["name"] == SKIPPED][0]
    pan = json.loads(panoptic_json_path(root, "training", version).read_text())
    return {
        Path(a["file_name"]).stem: sum(s["category_id"] == cat for s in a["segments_info"]) for a in pan["annotations"]
    }


def _records(out: Path) -> dict[str, dict]:
    m = load_manifest(out, "training")
    return {s["__key__"]: json.loads(s["json"]) for sh in m["shards"] for s in read_shard(out / sh["name"])}


def _by_name(rec: dict, names: dict[int, str]) -> list[tuple]:
    return sorted((names[k], tuple(b), c) for k, b, c in zip(rec["labels"], rec["boxes"], rec["iscrowd"]))


def test_synthetic_default_evaluates_every_thing():
    for version in ("v1.2", "v2.0"):
        assert all(lab["evaluate"] for lab in config_labels(version) if lab["instances"])
    marked = [lab["name"] for lab in config_labels("v2.0", (SKIPPED,)) if lab["instances"] and not lab["evaluate"]]
    assert marked == [SKIPPED]
    with pytest.raises(ValueError, match="not_evaluated names unknown"):
        synthesize("/nonexistent-never-written", cfg=SynthConfig(not_evaluated=("object--sign--ambiguous",)))


def test_reader_leaves_the_class_out_and_counts_its_objects(raw):
    version = _version(raw)
    labels = json.loads(config_path(raw, version).read_text())["labels"]
    evaluated = [i for i, lab in enumerate(labels) if lab["instances"] and lab["evaluate"]]
    for source in ("panoptic", "instances"):
        reader = VistasReader(raw, "training", source=source)
        assert reader.class_set == "evaluated" and reader.not_evaluated == [SKIPPED]
        assert [c.config_index for c in reader.classes] == evaluated
        assert [c.id for c in reader.classes] == list(range(1, len(evaluated) + 1))  # contiguous 1..K
        everything = VistasReader(raw, "training", source=source, class_set="all-instances")
        assert [c.name for c in everything.classes] == [lab["name"] for lab in labels if lab["instances"]]
        expected = _skipped_per_image(raw)
        assert sum(expected.values()) > 0
        for stem in reader.stems():
            s, a = reader.read(stem), everything.read(stem)
            assert (s.left_out or {}).get(SKIPPED, 0) == expected[stem]
            assert not a.left_out
            assert len(a.labels) - len(s.labels) == expected[stem]
    with pytest.raises(ValueError, match="class_set"):
        VistasReader(raw, "training", class_set="bogus")


def test_default_pack_holds_exactly_the_evaluated_classes(raw, tmp_path):
    m = pack_all(raw, tmp_path / "eval", "training")
    a = pack_all(raw, tmp_path / "all", "training", class_set="all-instances")
    names = [
        lab["name"] for lab in json.loads(config_path(raw, _version(raw)).read_text())["labels"] if lab["instances"]
    ]
    evaluated = [n for n in names if n != SKIPPED]
    assert [c["name"] for c in m["classes"]] == evaluated and [c["name"] for c in a["classes"]] == names
    assert [c["id"] for c in m["classes"]] == list(range(1, len(evaluated) + 1))
    n_skipped = sum(_skipped_per_image(raw).values())
    assert m["class_set"] == "evaluated"
    assert m["not_evaluated"] == {"classes": [SKIPPED], "objects": {SKIPPED: n_skipped}, "handling": "left-out"}
    assert a["class_set"] == "all-instances"
    assert a["not_evaluated"] == {"classes": [SKIPPED], "objects": {SKIPPED: n_skipped}, "handling": "kept"}
    assert "left out" in describe(m) and SKIPPED in describe(m)

    coco = json.loads((tmp_path / "eval" / "training.coco.json").read_text())
    assert [(c["id"], c["name"]) for c in coco["categories"]] == [(c["id"], c["name"]) for c in m["classes"]]
    assert {a_["category_id"] for a_ in coco["annotations"]} <= {c["id"] for c in m["classes"]}
    coco_all = json.loads((tmp_path / "all" / "training.coco.json").read_text())
    skipped_id = [c["id"] for c in a["classes"] if c["name"] == SKIPPED][0]
    assert len(coco["annotations"]) == len(coco_all["annotations"]) - n_skipped
    assert sum(x["category_id"] == skipped_id for x in coco_all["annotations"]) == n_skipped

    # Records: the same objects as the all-instances pack, minus the left-out class's (no ignore boxes).
    names_m = {c["id"]: c["name"] for c in m["classes"]}
    names_a = {c["id"]: c["name"] for c in a["classes"]}
    rec_m, rec_a = _records(tmp_path / "eval"), _records(tmp_path / "all")
    assert rec_m.keys() == rec_a.keys()
    for key in rec_m:
        assert _by_name(rec_m[key], names_m) == [o for o in _by_name(rec_a[key], names_a) if o[0] != SKIPPED]
    stats_a = {names_a[int(k)]: v for k, v in a["class_stats"].items()}
    assert {names_m[int(k)]: v for k, v in m["class_stats"].items()} == {
        k: v for k, v in stats_a.items() if k != SKIPPED
    }


def test_the_cli_flag_chooses_the_class_set(raw, tmp_path):
    parser = argparse.ArgumentParser()
    pack_cli.add_arguments(parser)
    for flag, class_set in (([], "evaluated"), (["--all-instance-classes"], "all-instances")):
        out = tmp_path / class_set
        assert pack_cli.run(parser.parse_args([str(raw), str(out), "--split", "validation", *flag])) == 0
        assert load_manifest(out, "validation")["class_set"] == class_set


def test_another_class_set_into_the_same_folder_is_refused(raw, tmp_path):
    pack(raw, tmp_path, "training", PackOptions(samples_per_shard=4))
    with pytest.raises(ValueError, match="class_set"):
        pack(raw, tmp_path, "training", PackOptions(samples_per_shard=4, class_set="all-instances"))


def test_merge_refuses_parts_of_different_class_sets(raw, tmp_path):
    pack(raw, tmp_path, "training", PackOptions(samples_per_shard=4, job_index=0, num_jobs=2))
    plan_path(tmp_path, "training").unlink()  # as when two jobs start at once and both write the plan
    pack(
        raw, tmp_path, "training", PackOptions(samples_per_shard=4, job_index=1, num_jobs=2, class_set="all-instances")
    )
    with pytest.raises(ValueError, match="different class sets.*evaluated: training-000000.tar"):
        merge(tmp_path, "training")
    assert not (tmp_path / "training.manifest.json").exists()


def test_verify_and_evaluate_refuse_splits_packed_with_different_class_sets(raw, tmp_path, capsys):
    from mapdet.commands import verify
    from mapdet.shards.manifest import classes_mismatch

    pack_all(raw, tmp_path, "training")
    pack_all(raw, tmp_path, "validation", class_set="all-instances")
    why = classes_mismatch(load_manifest(tmp_path, "training"), load_manifest(tmp_path, "validation"))
    assert "class set evaluated" in why and "class set all-instances" in why and "--all-instance-classes" in why
    assert classes_mismatch(load_manifest(tmp_path, "training"), load_manifest(tmp_path, "training")) is None
    assert verify.run(argparse.Namespace(out=str(tmp_path), split=None)) == 1
    assert "PROBLEM training (" in capsys.readouterr().out
    if _version(raw) == "v2.0":  # one subprocess is enough: the check is before any model or checkpoint
        r = run_cli(
            "evaluate",
            "--checkpoint",
            str(tmp_path / "no-checkpoint-needed"),
            "--set",
            f"data.shards={tmp_path}",
            f"train.out={tmp_path / 'run'}",
        )
        assert r.returncode == 2 and "have different classes" in r.stderr, r.stderr[-2000:]
        r = run_cli(
            "train",
            "--set",
            f"data.shards={tmp_path}",
            f"train.out={tmp_path / 'run'}",
            "model.arch=small",
            "model.min_size=128",
            "model.max_size=160",
        )
        assert r.returncode == 2 and "have different classes" in r.stderr, r.stderr[-2000:]
        assert not (tmp_path / "run" / "checkpoints").exists()  # stopped before the first step


def test_a_config_whose_instance_classes_are_all_evaluated_packs_them_all(shards, synth_root):
    m = load_manifest(shards, "training")
    assert (
        m["class_set"] == "evaluated" and len(m["classes"]) == len(VistasReader(synth_root, "training").classes) == 12
    )
    assert m["not_evaluated"] == {"classes": [], "objects": {}, "handling": "left-out"}
