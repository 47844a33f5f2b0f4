"""Every config key's declared range or choices, checked at load (YAML and --set alike) with the
checks across keys: a value outside is one line naming key, value and what is allowed, exit 2,
before anything else runs. Most of it in process; a few cases end to end."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from typing import get_type_hints

import pytest

from mapdet import cli
from mapdet.config import (
    ARCH_LAYOUT,
    CHOICES,
    RANGES,
    Config,
    ConfigError,
    Flag,
    Range,
    Text,
    check,
    key_types,
    load_config,
    reference_row,
)
from tests.helpers import REPO, accelerate_launch, run_cli

DEMO = REPO / "launch" / "configs" / "demo.yaml"


def _dataclass_keys() -> list[str]:
    """Every field of the config dataclasses, enumerated here, not taken from mapdet."""
    sections = get_type_hints(Config)
    return [f"{s.name}.{f.name}" for s in dataclasses.fields(Config) for f in dataclasses.fields(sections[s.name])]


def test_every_field_has_a_declared_range_or_choices():
    keys = _dataclass_keys()
    undeclared = [k for k in keys if k not in RANGES and k not in CHOICES]
    assert not undeclared, f"declare what these keys allow in mapdet/config.py RANGES (or CHOICES): {undeclared}"
    assert not set(RANGES) & set(CHOICES)
    assert set(RANGES) | set(CHOICES) == set(keys), "a declared key that no dataclass has"
    assert list(key_types()) == keys
    check(Config())  # the defaults are within their ranges


def _yaml(value) -> str:
    return "[" + ", ".join(map(_yaml, value)) + "]" if isinstance(value, list) else repr(value)


def outside(key: str) -> list:
    """Values just outside what ``key`` allows (as Python values, written to YAML by ``_yaml``)."""
    if key in CHOICES:
        return ["bogus"]
    rule, tp = RANGES[key], key_types()[key]
    if isinstance(rule, Text):
        return [""]
    if isinstance(rule, Flag):
        return [3]
    assert isinstance(rule, Range)
    number = int if int in (tp, *getattr(tp, "__args__", ()), *_items(tp)) else float
    bad = []
    if rule.lo is not None:
        bad.append(number(rule.lo) if rule.open in ("lo", "both") else number(rule.lo - 1))
    if rule.hi is not None:
        bad.append(number(rule.hi) if rule.open in ("hi", "both") else number(rule.hi + 1))
    assert bad, f"{key} allows every number: give it a range"
    if number is float:
        bad.append(float("nan"))
    if rule.each:
        bad = [[x] for x in bad] + ([[]] if rule.min_items else [])
    return bad


def _items(tp) -> tuple:
    for t in (tp, *getattr(tp, "__args__", ())):
        if getattr(t, "__origin__", None) is list:
            return t.__args__
    return ()


def _yaml_text(value) -> str:
    if isinstance(value, float) and value != value:
        return ".nan"
    return _yaml(value) if isinstance(value, list) else "''" if value == "" else str(value)


def mapdet(capsys, *argv: str) -> tuple[int, str]:
    """``mapdet ARGV`` in this process: (exit code, stderr). Any exception other than the CLI's own
    exit is a traceback a user would see, and fails the test."""
    with pytest.raises(SystemExit) as e:
        cli.main(list(argv))
    return e.value.code, capsys.readouterr().err


@pytest.mark.parametrize("key", _dataclass_keys())
def test_every_key_refuses_a_value_outside_its_range_from_set_and_from_yaml(key, tmp_path, capsys):
    section, name = key.split(".")
    for bad in outside(key):
        text = _yaml_text(bad)
        code, err = mapdet(capsys, "train", "--set", f"{key}={text}")
        assert code == 2 and err.count("\n") == 1 and f"'{key}'" in err, (key, text, err)
        assert err.startswith("mapdet train: error: config key") and "Traceback" not in err
        path = tmp_path / "bad.yaml"
        path.write_text(f"{section}:\n  {name}: {text}\n")
        code, err = mapdet(capsys, "evaluate", "--config", str(path))
        assert code == 2 and err.count("\n") == 1 and f"'{key}'" in err, (key, text, err)


@pytest.mark.parametrize("key", sorted(RANGES))
def test_the_edges_of_each_range_load(key):
    rule = RANGES[key]
    if not isinstance(rule, Range):
        return
    number = (
        int
        if int in (key_types()[key], *getattr(key_types()[key], "__args__", ()), *_items(key_types()[key]))
        else float
    )
    edges = [
        b for b, is_open in ((rule.lo, "lo"), (rule.hi, "hi")) if b is not None and rule.open not in (is_open, "both")
    ]
    for edge in edges:
        value = [number(edge)] if rule.each else number(edge)
        if key == "model.anchor_sizes":  # one per FPN level of the default arch
            value = value * ARCH_LAYOUT[Config().model.arch][0]
        overrides = [f"{key}={_yaml_text(value)}", *EDGE_COMPANIONS.get(key, [])]
        assert load_config(None, overrides)  # what the range says is allowed loads


# what an edge value needs beside it (the checks across keys)
EDGE_COMPANIONS = {
    "model.class_weights_list": ["model.class_weights=explicit"],
    "model.trainable_backbone_layers": ["model.arch=mobilenet_v3_large_fpn"],  # 6 stages; the others 5
}


# The mistakes a new user made on the demo config (issue 22), and what each does now.
MISTAKES = [
    ("optim.lrr=0.01", "refused", "'optim.lrr'"),
    ("optim.lr=fast", "refused", "'optim.lr'"),
    ("train.ckpt_every=0", "off", None),
    ("train.log_every=0", "off", None),
    ("model.min_size=0", "refused", "'model.min_size': 0 is not allowed: an integer >= 32"),
    ("optim.lr=-1", "refused", "'optim.lr': -1.0 is not allowed: a number > 0"),
    ("data.workers=-1", "refused", "'data.workers': -1 is not allowed: an integer >= 0"),
    ("model.nms_thresh=1.5", "refused", "'model.nms_thresh': 1.5 is not allowed: a number in [0, 1]"),
    ("eval.batch_size=0", "refused", "'eval.batch_size': 0 is not allowed: an integer >= 1"),
    ("model.detections_per_img=0", "refused", "'model.detections_per_img': 0 is not allowed"),
    ("train.max_steps=0", "refused", "'train.max_steps': 0 is not allowed: an integer >= 1"),
    ("optim.warmup_steps=-5", "refused", "'optim.warmup_steps': -5 is not allowed: an integer >= 0"),
    ("model.max_size=200", "refused", "model.max_size=200 is below model.min_size=256"),
    ("data.global_batch=9", "refused", "data.global_batch=9 does not split over 2 process(es)"),
]


@pytest.mark.parametrize("override, outcome, needle", MISTAKES, ids=[m[0] for m in MISTAKES])
def test_the_mistakes_of_a_new_user_are_refused_at_load_or_mean_off(override, outcome, needle, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")  # as under accelerate launch with 2 processes
    if outcome == "off":
        cfg = load_config(DEMO, [override], processes=2)
        assert getattr(cfg.train, override.split("=")[0].split(".")[1]) == 0
        return
    with pytest.raises(ConfigError) as e:
        load_config(DEMO, [override], processes=2)
    assert needle in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (["model.min_size=800", "model.max_size=640"], "model.max_size=640 is below model.min_size=800"),
        (["model.arch=small", "model.anchor_sizes=[16,32,64]"], "has 3 values: model.arch=small needs 4"),
        (["model.arch=resnet50_fpn_v2", "model.trainable_backbone_layers=6"], "model.arch=resnet50_fpn_v2 has 0..5"),
        (["model.class_weights=explicit"], "explicit needs the list"),
        (["model.class_weights_list=[1,2]"], "a list goes with explicit"),
        (["data.global_batch=6", "optim.grad_accum=4"], "does not split over 1 process(es) x optim.grad_accum=4"),
        (
            ["optim.milestones=[0.5,1.0]"],
            "'optim.milestones': [0.5, 1.0] is not allowed: a list of numbers, each in (0, 1)",
        ),
        (["eval.val_loss=1"], "'eval.val_loss': 1 is not allowed: true | false"),
    ],
)
def test_checks_across_keys_and_within_lists(overrides, needle):
    with pytest.raises(ConfigError, match=re.escape(needle)):
        load_config(None, overrides)


def test_global_batch_splits_over_the_processes_when_known():
    assert load_config(None, ["data.global_batch=8"], processes=4).data.global_batch == 8
    with pytest.raises(ConfigError, match=r"does not split over 3 process\(es\)"):
        load_config(None, ["data.global_batch=8"], processes=3)
    assert load_config(None, ["data.global_batch=8"]).data.global_batch == 8  # evaluate: any number of processes


def test_arch_layout_is_what_the_builders_make():
    from mapdet.config import ModelConfig
    from mapdet.modeling.build import _num_feature_maps, _stage_starts, build_model

    for arch, (maps, stages) in ARCH_LAYOUT.items():
        model = build_model(ModelConfig(arch=arch), 3)
        assert (_num_feature_maps(model.backbone), len(_stage_starts(model.backbone.body))) == (maps, stages), arch
    assert tuple(ARCH_LAYOUT) == CHOICES["model.arch"]


def test_the_readme_lists_every_key_with_its_range():
    readme = (REPO / "README.md").read_text()
    missing = [reference_row(k) for k in _dataclass_keys() if reference_row(k) not in readme]
    assert not missing, "add (or update) these rows in README.md's configuration reference:\n" + "\n".join(missing)


def test_a_bad_key_exits_2_end_to_end_before_torch_is_imported(tmp_path):
    r = run_cli("train", "--config", str(DEMO), "--set", "train.ckpt_every=-1", timeout=120)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr == (
        "mapdet train: error: config key 'train.ckpt_every': -1 is not allowed: an integer >= 0 "
        "(0 = off: checkpoints only at the end, on a stop and on preemption)\n"
    )
    code = (
        "import sys\nfrom mapdet.cli import main\ntry:\n"
        f"    main(['evaluate', '--config', {str(DEMO)!r}, '--set', 'eval.batch_size=0'])\n"
        "except SystemExit as e:\n    assert e.code == 2, e.code\n"
        "print('torch imported' if 'torch' in sys.modules else 'no torch')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert r.stdout.strip() == "no torch" and "'eval.batch_size'" in r.stderr, r.stderr[-2000:]


def test_under_accelerate_launch_the_error_line_comes_before_the_launchers_report():
    r = accelerate_launch("train", "--config", str(DEMO), "--set", "model.nms_thresh=1.5", timeout=300)
    lines = r.stderr.splitlines()
    line = "mapdet train: error: config key 'model.nms_thresh': 1.5 is not allowed: a number in [0, 1]"
    # The first process to exit makes the launcher SIGTERM the other, which may not have printed yet:
    # one or two copies of the line, but every copy before the launcher's first word.
    ours = [i for i, text in enumerate(lines) if text.startswith(line)]
    assert r.returncode == 1 and ours and ours == list(range(len(ours))), r.stderr[-3000:]
    assert "ChildFailedError" in r.stderr and "exitcode  : 2" in r.stderr  # what the README tells to read past
