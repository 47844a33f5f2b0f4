"""Fault injection, corrupt shards: training skips and counts per shard, stops past
train.max_bad_samples; evaluation fails naming shard and key unless eval.skip_corrupt."""

from __future__ import annotations

import io
import json
import re
import shutil
import tarfile
from pathlib import Path

import pytest
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mapdet import comm
from mapdet.config import DataConfig, EvalConfig, ModelConfig
from mapdet.data.loaders import TrainStream, eval_loader
from mapdet.evaluation.validation import validate
from mapdet.modeling.build import build_model
from mapdet.shards.manifest import load_manifest
from mapdet.shards.reader import CorruptSample, read_shard
from tests.faults.damage import rewrite
from tests.helpers import TINY, run_cli

# the small preset on 160x120 images, one process: well under a second per step


def jpeg(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (90, 140, 200)).save(buf, format="JPEG")
    return buf.getvalue()


def flip_header(tar: Path, member: int) -> None:
    """Flip a byte in a member's tar header: tarfile then stops there WITHOUT an error."""
    with tarfile.open(tar) as t:
        offset = t.getmembers()[member].offset
    data = bytearray(tar.read_bytes())
    data[offset + 100] ^= 0x01  # the mode field: the header checksum no longer matches
    tar.write_bytes(bytes(data))


def truncate(tar: Path, share: float = 0.5) -> None:
    tar.write_bytes(tar.read_bytes()[: int(tar.stat().st_size * share)])


def keys(shards: Path, split: str, shard: int) -> list[str]:
    return load_manifest(shards, split)["shards"][shard]["keys"]


@pytest.fixture(scope="module")
def faulty(tmp_path_factory, shards) -> Path:
    """Every training shard damaged: undecodable JPEG and JSON, a 1x1 image, boxes to sanitise
    (shard 0), truncated (shard 1), a damaged header after the first sample (shard 2)."""
    out = tmp_path_factory.mktemp("faulty") / "shards"
    shutil.copytree(shards, out)
    k = keys(out, "training", 0)
    rec = json.loads(next(s for s in read_shard(out / "training-000000.tar") if s["__key__"] == k[3])["json"])
    rec.update(boxes=[[-5, -5, 10, 10], [20, 20, 20, 40], [0, 0, 5, 5]], labels=[1, 1, 99], iscrowd=[0, 0, 0])
    tiny = {"image_id": 999, "width": 1, "height": 1, "boxes": [[0, 0, 1, 1]], "labels": [1], "iscrowd": [0]}
    rewrite(
        out / "training-000000.tar",
        {
            k[0]: {"jpg": b"\xff\xd8 not a jpeg"},
            k[1]: {"json": b"{not json"},
            k[2]: {"jpg": jpeg(1, 1), "json": json.dumps(tiny).encode()},
            k[3]: {"json": json.dumps(rec).encode()},  # one box clipped, one without width, one label 99
        },
    )
    truncate(out / "training-000001.tar")
    flip_header(out / "training-000002.tar", 2)  # samples 1..3 silently cut off
    return out


def scalars(run: Path) -> dict[str, list[float]]:
    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def train_args(shards: Path, run: Path, *extra: str) -> list[str]:
    return ["train", "--set", f"data.shards={shards}", f"train.out={run}", *TINY, *extra]


@pytest.fixture(scope="module")
def faulty_run(tmp_path_factory, faulty):
    run = tmp_path_factory.mktemp("faulty_run") / "run"
    r = run_cli(*train_args(faulty, run, "train.max_steps=6", "train.ckpt_every=3", "train.max_bad_samples=0.9"))
    return run, r


def test_training_skips_corrupt_samples_and_counts_them_per_shard(faulty_run, faulty):
    run, r = faulty_run
    assert r.returncode == 0, r.stderr[-3000:]
    k = keys(faulty, "training", 0)
    log = r.stdout + r.stderr
    assert (
        f"skipped bad sample in training-000000.tar ({k[0]}): training-000000.tar: sample '{k[0]}' does not decode"
        in log
    )
    assert f"skipped bad sample in training-000000.tar ({k[1]})" in log and "JSONDecodeError" in log
    assert "skipped bad sample in training-000002.tar (None): shard ends after 1 of 4 samples" in log
    assert "skipped bad sample in training-000001.tar (None): unreadable shard data after" in log
    assert k[2] not in log and k[3] not in log  # the 1x1 image and the sanitised one train
    assert "corrupt sample(s) skipped; so far per shard: training-" in log
    tb = scalars(run)
    per_shard = {t: v[-1] for t, v in tb.items() if t.startswith("train/bad_samples/")}
    assert set(per_shard) == {f"train/bad_samples/training-00000{i}.tar" for i in range(3)}
    assert tb["train/bad_samples"][-1] == sum(per_shard.values()) > 0
    assert tb["train/sanitized_boxes"][-1] >= 3  # k[3]: clipped + no width + label 99, each time drawn
    meta = json.loads((run / "checkpoints" / "step_0000006" / "meta.json").read_text())
    assert meta["counters"]["bad_by_shard"] == {t.split("/")[-1]: v for t, v in per_shard.items()}
    assert (run / "export" / "model.safetensors").exists()


def test_training_stops_with_a_message_past_max_bad_samples(faulty_run, faulty, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(faulty_run[0], run)
    r = run_cli(*train_args(faulty, run, "train.max_steps=40", "train.max_bad_samples=0.05"), "--resume", "auto")
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("stopping at step"))
    step = int(line.split()[3].rstrip(":"))
    assert 6 < step < 40 and "training samples were corrupt, above train.max_bad_samples=0.05" in line
    assert "per shard: training-" in line and "mapdet verify" in line
    assert (run / "checkpoints" / f"step_{step:07d}" / "meta.json").exists()  # stopped WITH a checkpoint
    meta = json.loads((run / "checkpoints" / f"step_{step:07d}" / "meta.json").read_text())["counters"]
    assert meta["bad_samples"] > 0.05 * (meta["samples"] + meta["bad_samples"])


def test_verify_names_every_damaged_shard_and_sample(faulty):
    r = run_cli("verify", str(faulty), "--split", "training")
    assert r.returncode == 1
    k = keys(faulty, "training", 0)
    for needle in (
        f"training-000000.tar: sample '{k[0]}' does not decode",
        f"training-000000.tar: sample '{k[1]}' does not decode",
        f"training-000000.tar: sample '{k[3]}' has 3 box(es) outside the image or with labels outside",
        "training-000001.tar: unreadable after",
        "training-000002.tar: holds 1 samples, manifest lists 4",
    ):
        assert needle in r.stdout, needle


def test_training_stream_gives_up_on_unreadable_shards_with_one_line(shards, tmp_path):
    out = tmp_path / "s"
    shutil.copytree(shards, out)
    for tar in out.glob("training-*.tar"):
        tar.write_bytes(b"")
    stream = TrainStream(
        out, load_manifest(out, "training"), DataConfig(batch_size=2, workers=1), rank=0, world=1, seed=0
    )
    with pytest.raises(CorruptSample) as e:
        next(iter(stream))
    msg = str(e.value)
    assert msg.startswith("no readable training sample in the last 1000 tries (lost per shard: training-000000.tar: ")
    assert f"mapdet verify {out}" in msg and "Traceback" not in msg and "\n" not in msg


def _damage_eval(out: Path, how: str) -> list[str] | None:
    """Damage validation-000000.tar; returns the keys the damage costs (None: from the key the
    error names to the end of the shard, for a truncation whose cut point depends on byte sizes)."""
    tar, k = out / "validation-000000.tar", keys(out, "validation", 0)
    if how == "jpeg":
        rewrite(tar, {k[1]: {"jpg": b"\xff\xd8 broken"}})
        return [k[1]]
    if how == "json":
        rewrite(tar, {k[2]: {"json": b'{"image_id": 1'}})
        return [k[2]]
    if how == "header":
        flip_header(tar, 4)  # members: k0.jpg k0.json k1.jpg k1.json k2.jpg ...
        return k[2:]
    if how == "renamed":
        rewrite(tar, {k[2]: {"__key__": "intruder"}})
        return k[2:]
    truncate(tar, 0.6)
    return None


@pytest.mark.parametrize("how,workers", [("jpeg", 0), ("json", 1), ("truncated", 0), ("header", 1), ("renamed", 0)])
def test_evaluation_fails_naming_shard_and_key_unless_skip_corrupt(shards, tmp_path, how, workers):
    out = tmp_path / "s"
    shutil.copytree(shards, out)
    lost = _damage_eval(out, how)
    m = load_manifest(out, "validation")
    with pytest.raises(CorruptSample) as e:
        list(eval_loader(out, m, 2, workers, rank=0, world=1))
    msg = str(e.value)
    if lost is None:
        k = keys(out, "validation", 0)
        named = re.search(r"from key '([^']+)' on", msg)
        lost = k[k.index(named.group(1)) :] if named else []
    assert msg.startswith("validation-000000.tar: ") and lost and f"'{lost[0]}'" in msg, msg
    assert "eval.skip_corrupt=true" in msg and "Traceback" not in msg
    batches = list(eval_loader(out, m, 2, workers, rank=0, world=1, skip_corrupt=True))
    seen = [t["key"] for b in batches for t in b.targets]
    left_out = [x["key"] for b in batches for x in b.bad]
    assert left_out == lost
    assert sorted(seen + left_out) == sorted(k for s in m["shards"] for k in s["keys"])


@pytest.fixture
def faulty_val(shards, tmp_path) -> tuple[Path, list[str]]:
    """Validation shards with an undecodable JPEG in shard 0 and shard 1 truncated."""
    out = tmp_path / "s"
    shutil.copytree(shards, out)
    lost = _damage_eval(out, "jpeg")
    truncate(out / "validation-000001.tar", 0.3)
    return out, lost


def _evaluate(faulty_run, shards: Path, tmp_path: Path, *extra: str):
    weights = str(faulty_run[0] / "export" / "model.safetensors")
    return run_cli(
        "evaluate",
        "--checkpoint",
        weights,
        "--out",
        str(tmp_path / "eval"),
        "--set",
        f"data.shards={shards}",
        f"train.out={tmp_path / 'run'}",
        *TINY[:3],
        "eval.batch_size=3",
        *extra,
    )


def test_evaluate_cli_fails_naming_the_sample_or_counts_what_it_left_out(faulty_run, faulty_val, tmp_path):
    out, lost = faulty_val
    r = _evaluate(faulty_run, out, tmp_path, "eval.workers=1")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert f"mapdet evaluate: error: validation-000000.tar: sample '{lost[0]}' does not decode" in r.stderr
    assert not (tmp_path / "eval" / "metrics.json").exists()
    r = _evaluate(faulty_run, out, tmp_path, "eval.workers=0", "eval.skip_corrupt=true", "eval.num_images_logged=0")
    assert r.returncode == 0, r.stderr[-3000:]
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    left = {x["key"]: x["reason"] for x in metrics["left_out"]}
    assert metrics["images_left_out"] == len(left) >= 2 and metrics["images"] + len(left) == 6
    assert lost[0] in left and any(r.startswith("validation-000001.tar: unreadable after") for r in left.values())
    assert f"({len(left)} left out: corrupt)" in r.stdout


def test_evaluate_with_skip_corrupt_also_logs_images(faulty_run, faulty_val, tmp_path):
    r = _evaluate(faulty_run, faulty_val[0], tmp_path, "eval.workers=0", "eval.skip_corrupt=true")
    assert r.returncode == 0, r.stderr[-3000:]


def test_a_corrupt_sample_on_another_rank_fails_this_rank_too(shards, monkeypatch):
    """Rank 0 reads clean data, rank 1 hit a corrupt sample: rank 0 raises the same error instead of
    going on to the scoring collectives, where it would wait for rank 1 until the timeout."""
    m = load_manifest(shards, "validation")
    gt = json.loads((shards / "validation.coco.json").read_text())
    model = build_model(ModelConfig(arch="small", min_size=128, max_size=160), len(m["classes"]) + 1)
    monkeypatch.setattr(comm, "get_world_size", lambda: 2)
    monkeypatch.setattr(comm, "get_rank", lambda: 0)
    error = "validation-000001.tar: sample 'k' does not decode: RuntimeError: bad"
    monkeypatch.setattr(comm, "all_gather_object", lambda own: [own, own._replace(error=error)])
    with pytest.raises(CorruptSample, match="validation-000001.tar: sample 'k' does not decode"):
        validate(model, "cpu", EvalConfig(workers=0, val_loss=False), shards, m, gt)
