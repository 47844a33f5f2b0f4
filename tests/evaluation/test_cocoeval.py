"""`mapdet cocoeval`: exit codes, printed table, metrics.json, and 2 processes equal to 1."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from mapdet.cli import main
from mapdet.evaluation.coco import evaluate_coco
from tests.evaluation.cocodata import STATS, pycocotools_eval, random_coco
from tests.helpers import accelerate_launch


def cocoeval(*args: str) -> int:
    with pytest.raises(SystemExit) as stop:
        main(["cocoeval", *args])
    return stop.value.code


@pytest.fixture
def files(tmp_path):
    gt, dets = random_coco(0)
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "dt.json").write_text(json.dumps(dets))
    return tmp_path, gt, dets


def test_scores_prints_and_writes_metrics(files, capsys):
    tmp, gt, dets = files
    assert (
        cocoeval(
            "--gt",
            str(tmp / "gt.json"),
            "--results",
            str(tmp / "dt.json"),
            "--max-dets",
            "300",
            "--out",
            str(tmp / "out" / "metrics.json"),
        )
        == 0
    )
    bbox = json.loads((tmp / "out" / "metrics.json").read_text())["bbox"]
    expected = evaluate_coco(gt, dets, max_dets=(300,))
    assert [bbox[k] for k in STATS] == [expected.summary()[k] for k in STATS]
    assert bbox["AP_at_maxdets"] == {str(m): expected.ap(max_dets=m) for m in (1, 10, 100, 300)}
    assert [r["name"] for r in bbox["per_class"]] == [f"class{c}" for c in (1, 2, 3, 5, 7)]
    out = capsys.readouterr().out
    assert "class7" in out and f"AP@300 {expected.ap(max_dets=300):7.3f}" in out


def test_empty_results_score_zero(files):
    tmp, _, _ = files
    (tmp / "empty.json").write_text("[]")
    assert (
        cocoeval("--gt", str(tmp / "gt.json"), "--results", str(tmp / "empty.json"), "--out", str(tmp / "m.json")) == 0
    )
    assert json.loads((tmp / "m.json").read_text())["bbox"]["AP"] == 0.0


@pytest.mark.parametrize(
    "results, max_dets, message",
    [
        ("missing.json", "100", "results file not found"),
        ("broken.json", "100", "not valid JSON"),
        ("object.json", "100", "must be a list"),
        ("alien.json", "100", "category ids not in the ground truth: \\[99\\]"),
        ("dt.json", "100,x", "--max-dets must be comma-separated integers"),
        ("dt.json", "0", "must be >= 1"),
    ],
)
def test_bad_input_exits_2_with_a_message(files, capsys, results, max_dets, message):
    tmp, _, dets = files
    (tmp / "broken.json").write_text('[{"image_id": 1,')
    (tmp / "object.json").write_text('{"image_id": 1}')
    (tmp / "alien.json").write_text(json.dumps([{**dets[0], "category_id": 99}]))
    code = cocoeval(
        "--gt",
        str(tmp / "gt.json"),
        "--results",
        str(tmp / results),
        "--max-dets",
        max_dets,
        "--out",
        str(tmp / "m.json"),
    )
    assert code == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp / "m.json").exists()


def test_missing_ground_truth_exits_2(files, capsys):
    tmp, _, _ = files
    assert cocoeval("--gt", str(tmp / "nope.json"), "--results", str(tmp / "dt.json")) == 2
    assert "ground truth file not found" in capsys.readouterr().err


@pytest.mark.slow
def test_two_processes_write_the_same_metrics(files):
    tmp, _, _ = files
    args = ["cocoeval", "--gt", str(tmp / "gt.json"), "--results", str(tmp / "dt.json")]
    assert cocoeval(*args[1:], "--out", str(tmp / "one.json")) == 0
    run = accelerate_launch(*args, "--out", str(tmp / "two.json"))
    assert run.returncode == 0, run.stderr[-2000:]
    assert "2 process(es)" in run.stdout and run.stdout.count("AP@300") == 1  # rank 0 prints
    assert (tmp / "two.json").read_text() == (tmp / "one.json").read_text()


def test_one_process_never_imports_torch(files):
    # torch costs ~1.5 s of start-up, most of the whole command's time; one process has no use for it.
    tmp, _, _ = files
    code = (
        "import sys\n"
        "from mapdet.cli import main\n"
        "try:\n"
        f"    main(['cocoeval', '--gt', {str(tmp / 'gt.json')!r}, '--results', {str(tmp / 'dt.json')!r}])\n"
        "except SystemExit as e:\n"
        "    assert e.code in (0, None), e.code\n"
        "print('torch imported' if 'torch' in sys.modules else 'no torch')\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, "WORLD_SIZE": "1"}
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().endswith("no torch"), r.stdout[-500:]


def _cocoeval_files(tmp, gt, dets, capsys) -> tuple[int, str]:
    (tmp / "gt.json").write_text(json.dumps(gt))
    (tmp / "dt.json").write_text(json.dumps(dets))
    code = cocoeval("--gt", str(tmp / "gt.json"), "--results", str(tmp / "dt.json"), "--out", str(tmp / "m.json"))
    return code, capsys.readouterr().err


def _pycocotools(gt, dets):
    """pycocotools' 12 summary numbers, or the type of the exception it refuses the input with."""
    try:
        return list(pycocotools_eval(gt, dets).stats)
    except Exception as e:  # noqa: BLE001 - what it raises is what is compared
        return type(e)


K = 5  # the detection made wrong


@pytest.mark.parametrize(
    "key, bad, pycocotools_does",
    [
        ("image_id", str, "refuse"),  # "107": "Results do not correspond to current coco set"
        ("image_id", lambda v: v + 0.5, "refuse"),
        ("image_id", float, "score as the integer"),  # 107.0 == 107 for a Python set
        ("category_id", str, "drop it"),  # "1" is no category of the GT: silently left out
        ("category_id", lambda v: v + 0.5, "drop it"),
        ("category_id", lambda v: True, "score as the integer"),  # True == 1
    ],
)
def test_ids_that_are_not_integers_are_refused_naming_the_first(tmp_path, capsys, key, bad, pycocotools_does):
    gt, dets = random_coco(0)
    wrong = [dict(d) for d in dets]
    wrong[K][key] = bad(wrong[K][key])
    if key == "category_id" and wrong[K][key] is True:
        dets[K] = {**dets[K], key: 1}  # what pycocotools takes True for
    without = dets[:K] + dets[K + 1 :]
    expected = {
        "refuse": AssertionError,
        "score as the integer": _pycocotools(gt, dets),
        "drop it": _pycocotools(gt, without),
    }
    assert _pycocotools(gt, wrong) == expected[pycocotools_does]

    wrong[K + 3] = {**wrong[K + 3], key: "later"}  # only the first offender is named
    code, err = _cocoeval_files(tmp_path, gt, wrong, capsys)
    assert code == 2 and err.count("\n") == 1 and not (tmp_path / "m.json").exists()
    assert f"detection {K}: {key} {wrong[K][key]!r} is not an integer" in err, err


@pytest.mark.parametrize(
    "part, index, key, bad",
    [
        ("images", 3, "id", "107"),
        ("categories", 1, "id", 2.0),
        ("annotations", 4, "id", True),
        ("annotations", 6, "image_id", 114.5),
        ("annotations", 2, "category_id", "1"),
    ],
)
def test_ground_truth_ids_that_are_not_integers_are_refused(tmp_path, capsys, part, index, key, bad):
    gt, dets = random_coco(0)
    gt[part][index] = {**gt[part][index], key: bad}
    code, err = _cocoeval_files(tmp_path, gt, dets, capsys)
    who = {
        "images": "ground-truth image",
        "categories": "ground-truth category",
        "annotations": "ground-truth annotation",
    }
    assert code == 2 and f"{who[part]} {index}: {key} {bad!r} is not an integer" in err, err
