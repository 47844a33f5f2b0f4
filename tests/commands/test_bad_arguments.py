"""Every mapdet command with a user's mistakes: missing files, unreadable files (a folder or
binary bytes where a file belongs), malformed JSON/YAML, numbers out of range. Each is one line
naming what to fix and exit 2 (verify: 1 for what it finds inside the shards, as documented),
never a traceback, and nothing is started before the refusal."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from accelerate.state import AcceleratorState

from mapdet import cli
from tests.helpers import TINY


@pytest.fixture(scope="module")
def bad(tmp_path_factory, synth_root, shards) -> dict[str, Path]:
    """Named paths: what exists (raw, shards) and what a user may wrongly give."""
    tmp = tmp_path_factory.mktemp("bad")
    paths = {"raw": synth_root, "shards": shards, "missing": tmp / "missing", "folder": tmp / "folder"}
    paths["folder"].mkdir()
    for name, data in {
        "binary": b"\xff\xfe\x00\x81 not text \x00",
        "json": b'[{"image_id": 1,',
        "yaml": b"train: [1,\n  :",
        "file": b"x",
        "empty": b"[]",
    }.items():
        paths[name] = tmp / name
        paths[name].write_bytes(data)
    paths["raw_bad_config"] = tmp / "raw_bad_config"
    shutil.copytree(synth_root, paths["raw_bad_config"])
    (paths["raw_bad_config"] / "config_v2.0.json").write_text('{"labels": [')
    paths["shards_bad_manifest"] = tmp / "shards_bad_manifest"
    shutil.copytree(shards, paths["shards_bad_manifest"])
    (paths["shards_bad_manifest"] / "training.manifest.json").write_text("[1, 2]")
    (paths["shards_bad_manifest"] / "validation.manifest.json").write_text('{"format":')
    paths["parts"] = tmp / "parts"
    (paths["parts"] / ".parts").mkdir(parents=True)
    (paths["parts"] / ".parts" / "training.plan.json").write_text('{"jobs": ')
    return paths


def _run_folder(shards: Path, out: Path) -> list[str]:
    return ["--set", f"data.shards={shards}", f"train.out={out}", *TINY]


# (command line with {name} standing for the paths of ``bad``, exit code, what the one line says)
CASES = [
    ("synth {out} --train -1", 2, "argument --train: -1 is not allowed: an integer >= 0"),
    ("synth {out} --object-scale 0", 2, "argument --object-scale: 0 is not allowed: a number > 0"),
    ("synth {out} --size 8x8", 2, "both sides must be at least 16 pixels"),
    ("synth {file}", 2, "File exists"),
    ("pack {missing} {out} --split training", 2, "holds no Mapillary Vistas release"),
    ("pack {file} {out} --split training", 2, "holds no Mapillary Vistas release"),
    ("pack {raw_bad_config} {out} --split training", 2, "config_v2.0.json"),
    ("pack {raw} {out} --split training --samples-per-shard 0", 2, "argument --samples-per-shard: 0 is not allowed"),
    (
        "pack {raw} {out} --split training --quality 101",
        2,
        "argument --quality: 101 is not allowed: an integer in [1, 100]",
    ),
    ("pack {raw} {out} --split training --max-side 0", 2, "argument --max-side: 0 is not allowed"),
    ("pack {raw} {file} --split training", 2, "Not a directory"),
    ("merge {missing} --split training", 2, "has no training pack in progress"),
    ("merge {parts} --split training", 2, "training.plan.json"),
    ("verify {missing}", 2, "no *.manifest.json in"),
    ("verify {file}", 2, "no *.manifest.json in"),
    ("verify {shards_bad_manifest}", 1, "PROBLEM"),
    ("peek {missing}", 2, "no manifest"),
    ("peek {shards_bad_manifest}", 2, "training.manifest.json: a JSON list, not a manifest"),
    ("peek {shards_bad_manifest} --split validation", 2, "validation.manifest.json is not valid JSON"),
    ("peek {shards} --batches 0", 2, "argument --batches: 0 is not allowed: an integer >= 1"),
    ("train --config {missing}", 2, "config file not found"),
    ("train --config {folder}", 2, "cannot be read: Is a directory"),
    ("train --config {binary}", 2, "is not text"),
    ("train --config {yaml}", 2, "not a plain YAML mapping"),
    ("train --set optim.lr=-1", 2, "config key 'optim.lr': -1.0 is not allowed: a number > 0"),
    ("train {run_on_missing}", 2, "no manifest"),
    ("train {run_on_bad_manifest}", 2, "not a manifest written by `mapdet pack`"),
    ("train {run} --resume {missing}", 2, "does not exist: give a checkpoint folder"),
    ("evaluate --config {yaml}", 2, "not a plain YAML mapping"),
    ("evaluate --set eval.max_dets=[0]", 2, "config key 'eval.max_dets'"),
    ("evaluate {run} --checkpoint {missing}", 2, "does not exist: give a checkpoint folder"),
    ("evaluate {run} --checkpoint {binary}", 2, "not a weights file torch can read"),
    ("predict --weights {missing} --images {folder} --out {out}/p.json", 2, "does not exist"),
    ("predict --weights {binary} --images {folder} --out {out}/p.json", 2, "not a weights file torch can read"),
    ("predict --checkpoint {missing} --images {folder} --out {out}/p.json", 2, "neither a checkpoint folder"),
    ("predict --weights {missing} --images {folder} --out {out}/p.json --score-thresh 2", 2, "argument --score-thresh"),
    ("predict --weights {missing} --images {folder} --out {out}/p.json --batch-size 0", 2, "argument --batch-size"),
    ("cocoeval --gt {missing} --results {empty}", 2, "ground truth file not found"),
    ("cocoeval --gt {folder} --results {empty}", 2, "ground truth file not found"),
    ("cocoeval --gt {binary} --results {empty}", 2, "is not valid JSON"),
    ("cocoeval --gt {gt} --results {json}", 2, "results file"),
    ("cocoeval --gt {gt} --results {empty} --max-dets 0", 2, "--max-dets values must be >= 1"),
    ("diagnose --gt {missing} --results {empty} --out {out}", 2, "ground truth file not found"),
    ("diagnose --gt {gt} --results {binary} --out {out}", 2, "results file"),
    ("diagnose --gt {gt} --results {json} --out {out}", 2, "is not valid JSON"),
    ("diagnose --gt {gt} --results {empty} --out {out} --config {yaml}", 2, "not a plain YAML mapping"),
    ("diagnose --gt {gt} --results {empty} --out {out} --sweep-nms 1.5", 2, "argument --sweep-nms: 1.5"),
    ("diagnose --gt {gt} --results {empty} --out {out} --run {missing}", 2, "no such run folder"),
    ("diagnose --gt {gt} --results {empty} --out {file}", 2, "File exists"),
    ("weights fetch torchvision:Nope.X", 2, "is not a torchvision weight name"),
    ("weights list --dir {file}", 2, "is a file, not a folder"),
    ("demo --steps 0 --out {out}", 2, "argument --steps: 0 is not allowed: an integer >= 1"),
    ("demo --processes 0 --out {out}", 2, "argument --processes: 0 is not allowed"),
]


@pytest.fixture
def fresh_accelerate():
    """accelerate keeps one state per process: the commands that make an Accelerator start clean."""
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.mark.parametrize("line, code, needle", CASES, ids=[c[0] for c in CASES])
def test_a_bad_argument_is_one_line_and_an_exit_code(bad, tmp_path, capsys, fresh_accelerate, line, code, needle):
    names = {k: str(v) for k, v in bad.items()}
    names.update(out=str(tmp_path / "out"), gt=str(bad["shards"] / "validation.coco.json"))
    run, missing_run = tmp_path / "run", tmp_path / "run_missing"
    argv = []
    for word in line.split():
        key = word[1:-1] if word.startswith("{") and word.endswith("}") else None
        if key == "run":
            argv += _run_folder(bad["shards"], run)
        elif key == "run_on_missing":
            argv += _run_folder(bad["missing"], missing_run)
        elif key == "run_on_bad_manifest":
            argv += _run_folder(bad["shards_bad_manifest"], missing_run)
        else:
            argv.append(word.format(**names))
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    out = capsys.readouterr()
    said = [ln for ln in out.err.splitlines() + out.out.splitlines() if needle in ln]
    assert e.value.code == code and said, (e.value.code, out.err[-2000:], out.out[-2000:])
    assert "Traceback" not in out.err + out.out
    if code == 2:  # one line saying what is wrong (argparse's usage lines before it are fine)
        errors = [ln for ln in out.err.splitlines() if ln.startswith(f"mapdet {argv[0]}:")]
        assert errors == said[:1], out.err[-2000:]
    assert not (tmp_path / "out").exists()  # nothing written before the refusal
