"""`mapdet verify` and the pack/merge/peek command lines, run as a user runs them."""

from __future__ import annotations

import shutil

from mapdet.shards.manifest import load_manifest
from tests.helpers import run_cli


def test_cli_pack_verify_peek_round_trip(tmp_path, synth_root):
    out = tmp_path / "shards"
    r = run_cli("pack", str(synth_root), str(out), "--split", "validation", "--samples-per-shard", "4")
    assert r.returncode == 0, r.stderr
    assert "validation: 6 images" in r.stdout
    r = run_cli("verify", str(out))
    assert r.returncode == 0 and "0 problem(s)" in r.stdout, r.stdout + r.stderr
    r = run_cli("peek", str(out), "--split", "validation", "--batches", "2", "--batch-size", "2")
    assert r.returncode == 0 and r.stdout.count("uint8 (3, 120, 160)") == 4, r.stdout + r.stderr


def test_cli_multi_job_pack_then_merge(tmp_path, synth_root):
    out = tmp_path / "shards"
    for j in ("0", "1"):
        r = run_cli(
            "pack",
            str(synth_root),
            str(out),
            "--split",
            "training",
            "--samples-per-shard",
            "4",
            "--job-index",
            j,
            "--num-jobs",
            "2",
        )
        assert r.returncode == 0 and "mapdet merge" in r.stdout, r.stderr
    assert not (out / "training.manifest.json").exists()
    r = run_cli("merge", str(out), "--split", "training")
    assert r.returncode == 0 and load_manifest(out, "training")["num_samples"] == 12, r.stderr


def test_cli_errors_are_messages_not_tracebacks(tmp_path, synth_root):
    r = run_cli("pack", str(tmp_path / "nowhere"), str(tmp_path / "o"), "--split", "training")
    assert r.returncode == 2 and "Traceback" not in r.stderr and "nowhere" in r.stderr
    r = run_cli("verify", str(tmp_path))
    assert r.returncode == 2 and "no *.manifest.json" in r.stderr


def _copy(shards, tmp_path):
    dst = tmp_path / "s"
    shutil.copytree(shards, dst)
    return dst


def test_verify_catches_a_flipped_byte(shards, tmp_path):
    out = _copy(shards, tmp_path)
    tar = out / "training-000001.tar"
    data = bytearray(tar.read_bytes())
    data[2000] ^= 0xFF
    tar.write_bytes(bytes(data))
    r = run_cli("verify", str(out))
    assert r.returncode == 1
    assert "PROBLEM training-000001.tar: sha256 differs" in r.stdout
    assert "training-000000.tar" not in r.stdout


def test_verify_catches_a_missing_shard_and_an_unlisted_one(shards, tmp_path):
    out = _copy(shards, tmp_path)
    (out / "validation-000000.tar").rename(out / "stray.tar")
    r = run_cli("verify", str(out), "--split", "validation")
    assert r.returncode == 1
    assert "PROBLEM validation-000000.tar: missing" in r.stdout
    assert "PROBLEM stray.tar: not listed" in r.stdout
