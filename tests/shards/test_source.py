"""Shards from anywhere WebDataset reads: a folder, http(s):// on a real loopback server started
here, and pipe: commands; the faults a network brings (a dropped connection, a 404, a stall)."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import psutil
import pytest
import torch

from mapdet.config import DataConfig
from mapdet.data.loaders import TrainStream, eval_loader
from mapdet.shards.manifest import ManifestError, load_coco, load_manifest
from mapdet.shards.reader import CorruptSample
from mapdet.shards.source import MissingFile, StreamError, check_name, shard_source
from tests.helpers import mapdet
from tests.shards.loopback import LoopbackServer


def _source(where, retries: int = 2, timeout: float = 5.0):
    return shard_source(where, DataConfig(stream_retries=retries, read_timeout_s=timeout))


def _read_all(source, split: str = "validation", skip_corrupt: bool = False, workers: int = 0):
    """(key -> (image, boxes)) of every image read, and the keys left out."""
    batches = list(eval_loader(source, load_manifest(source, split), 2, workers, 0, 1, skip_corrupt))
    seen = {t["key"]: (im, t["boxes"]) for b in batches for im, t in zip(b.images, b.targets)}
    return seen, [x["key"] for b in batches for x in b.bad]


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k][0], b[k][0]) and torch.equal(a[k][1], b[k][1]) for k in a)


def _keys(shards: Path, split: str, i: int) -> list[str]:
    return load_manifest(shards, split)["shards"][i]["keys"]


def test_sources_are_parsed_and_other_schemes_get_the_pipe_form(tmp_path):
    assert _source(tmp_path).local_dir == tmp_path
    http = _source("http://127.0.0.1:9/vistas/", retries=5, timeout=2)
    assert (http.kind, http.retries, http.read_timeout_s) == ("http", 5, 2.0)
    assert http.where("training-000000.tar") == "http://127.0.0.1:9/vistas/training-000000.tar"
    pipe = _source("pipe:aws s3 cp s3://bucket/vistas/{name} -")
    assert pipe.kind == "pipe" and pipe.where("training-000000.tar") == "training-000000.tar"  # not the command
    with pytest.raises(ValueError, match=r"needs \{name\}"):
        _source("pipe:aws s3 cp s3://bucket/vistas/x.tar -")
    with pytest.raises(ValueError, match=r"pipe:aws s3 cp s3://bucket/path/\{name\} -"):
        _source("s3://bucket/vistas")
    assert shard_source("shards").retries == DataConfig().stream_retries  # the defaults' one home
    with pytest.raises(ValueError, match="data.read_timeout_s more than 0"):
        _source(tmp_path, timeout=0)


@pytest.mark.parametrize("name", ["a;touch PWNED", "$(touch PWNED)", "x`id`.tar", "../x.tar", "-rf", ".x", "a b", ""])
def test_names_that_could_inject_or_escape_are_refused(name):
    with pytest.raises(ValueError, match="refusing file name"):
        check_name(name)


def test_a_remote_manifest_naming_a_shell_command_is_refused_before_anything_runs(shards, tmp_path):
    out = tmp_path / "s"
    shutil.copytree(shards, out)
    m = json.loads((out / "validation.manifest.json").read_text())
    m["shards"][1]["name"] = "x$(touch PWNED)"
    (out / "validation.manifest.json").write_text(json.dumps(m))
    source = _source(f"pipe:cd {tmp_path} && cat {out}/{{name}}")
    with pytest.raises(ManifestError, match=r"validation.manifest.json: refusing file name 'x\$\(touch PWNED\)'"):
        load_manifest(source, "validation")
    assert not (tmp_path / "PWNED").exists()
    with pytest.raises(ValueError, match="refusing file name"):
        load_manifest(source, "x;touch PWNED")  # a split name too
    assert not (tmp_path / "PWNED").exists()


def test_a_pipe_command_reads_what_the_folder_holds(shards):
    source = _source(f"pipe:cat {shards}/{{name}}")
    assert load_manifest(source, "training") == load_manifest(shards, "training")
    assert load_coco(source, "validation") == json.loads((shards / "validation.coco.json").read_text())
    assert _same(_read_all(source, workers=1)[0], _read_all(shards)[0])
    cfg = DataConfig(batch_size=2, workers=1, shuffle_buffer=4)
    piped = next(iter(TrainStream(source, load_manifest(source, "training"), cfg, rank=0, world=1, seed=3)))
    local = next(iter(TrainStream(shards, load_manifest(shards, "training"), cfg, rank=0, world=1, seed=3)))
    assert [t["key"] for t in piped.targets] == [t["key"] for t in local.targets]
    assert all(torch.equal(a, b) for a, b in zip(piped.images, local.images))


def test_a_failing_pipe_command_is_retried_then_named_by_its_file_not_its_command(shards, tmp_path):
    log = tmp_path / "runs.log"
    source = _source(f"pipe:echo run >> {log}; cat {tmp_path}/nowhere/{{name}}", retries=2)
    with pytest.raises(ManifestError) as e:
        load_manifest(source, "validation")
    msg = str(e.value)
    assert msg.startswith("cannot read the manifest: validation.manifest.json: the pipe: command exited with status 1")
    assert "gave up after 2 retries (data.stream_retries)" in msg and "echo run" not in msg
    assert log.read_text().count("run") == 3  # the first try and 2 retries


def test_a_stalled_pipe_command_times_out_and_is_killed(shards, tmp_path):
    stall = f"head -c 3000 {shards}/{{name}}; exec sleep 300"  # part of each shard, then silence
    source = _source(f"pipe:case {{name}} in *.tar) {stall};; *) cat {shards}/{{name}};; esac", 1, 0.5)
    start = time.time()
    with pytest.raises(CorruptSample, match=r"validation-000000.tar: .*no data for 0.5 s \(data.read_timeout_s\)"):
        _read_all(source)
    assert time.time() - start < 10
    time.sleep(0.2)
    sleepers = [p for p in psutil.process_iter(["cmdline"]) if p.info["cmdline"] == ["sleep", "300"]]
    assert not sleepers  # the stalled command was killed, not left behind


def test_http_reads_what_the_folder_holds_and_cli_commands_take_the_url(shards, capsys):
    with LoopbackServer(shards) as server:
        source = _source(server.url + "/")
        assert load_manifest(source, "validation") == load_manifest(shards, "validation")
        assert _same(_read_all(source, workers=2)[0], _read_all(shards)[0])
        code, out, err = mapdet(capsys, "verify", server.url)  # no listing over HTTP: training and validation
        assert code == 0 and "2 split(s), 0 problem(s)" in out, out + err
        code, out, err = mapdet(capsys, "peek", server.url, "--split", "validation", "--eval", "--batch-size", "2")
        assert code == 0 and out.count("uint8 (3, 120, 160)") == 6, out + err
        assert server.requests["training-000000.tar"] == 1  # verify hashes and decodes in one download
        with pytest.raises(ManifestError, match=r"no manifest http://127.0.0.1:\d+/testing.manifest.json"):
            load_manifest(source, "testing")


@pytest.mark.parametrize("ranges", [True, False])
def test_a_dropped_connection_is_resumed_and_nothing_is_lost(shards, ranges):
    local = _read_all(shards)[0]
    with LoopbackServer(shards, ranges=ranges) as server:
        server.fault("validation-000000.tar", "drop", times=1)
        seen, left_out = _read_all(_source(server.url))
    assert _same(seen, local) and not left_out
    assert server.requests["validation-000000.tar"] == 2


def test_a_connection_that_always_drops_is_a_corrupt_shard_after_the_retries(shards):
    with LoopbackServer(shards) as server:
        server.fault("validation-000001.tar", "drop")
        source = _source(server.url, retries=1)
        with pytest.raises(CorruptSample) as e:
            _read_all(source)
        assert server.requests["validation-000001.tar"] == 2
        seen, left_out = _read_all(source, skip_corrupt=True)
    msg = str(e.value)
    assert msg.startswith("validation-000001.tar: unreadable after") and "the connection closed before the end" in msg
    assert "gave up after 1 retry (data.stream_retries)" in msg and " @ <" not in msg
    _only_the_rest_of_the_shard_lost(shards, 1, seen, left_out)


def _only_the_rest_of_the_shard_lost(shards: Path, shard: int, seen: dict, left_out: list[str]) -> None:
    """The shard's images from the fault on are left out (those before it were read whole); every
    other image is read, the same as from the folder."""
    keys = _keys(shards, "validation", shard)
    assert left_out and left_out == keys[len(keys) - len(left_out) :]
    assert _same(seen, {k: v for k, v in _read_all(shards)[0].items() if k not in left_out})


def test_a_404_is_final_for_its_shard_and_costs_nothing_else(shards):
    lost = _keys(shards, "validation", 1)
    with LoopbackServer(shards) as server:
        server.fault("validation-000001.tar", "404")
        source = _source(server.url)
        with pytest.raises(MissingFile, match="validation-000001.tar: HTTP 404"):
            source.open("validation-000001.tar")
        with pytest.raises(CorruptSample, match=f"validation-000001.tar: .*HTTP 404.*from key '{lost[0]}' on"):
            _read_all(source)
        seen, left_out = _read_all(source, skip_corrupt=True)
        assert server.requests["validation-000001.tar"] == 3  # no retry: the server has answered

        server.fault("training-000001.tar", "404")
        source = _source(server.url)
        cfg = DataConfig(batch_size=2, workers=1, shuffle_buffer=1)
        stream = iter(TrainStream(source, load_manifest(source, "training"), cfg, rank=0, world=1, seed=0))
        batches = [next(stream) for _ in range(12)]
    assert left_out == lost and _same(seen, {k: v for k, v in _read_all(shards)[0].items() if k not in lost})
    bad = [b for batch in batches for b in batch.bad]
    assert bad and all(b["shard"] == "training-000001.tar" and "HTTP 404" in b["reason"] for b in bad)
    assert all(b["samples"] == 4 for b in bad)  # each draw of the shard counts its 4 samples, as a corrupt one does
    trained = {t["key"] for batch in batches for t in batch.targets}
    assert trained and not trained & set(_keys(shards, "training", 1))


def test_a_stalled_server_times_out_instead_of_hanging(shards):
    with LoopbackServer(shards) as server:
        server.fault("validation-000000.tar", "stall")
        source = _source(server.url, retries=1, timeout=0.5)
        start = time.time()
        with pytest.raises(StreamError, match=r"no data for 0.5 s \(data.read_timeout_s\); \d+ bytes read"):
            source.read_bytes("validation-000000.tar")
        assert time.time() - start < 5
        seen, left_out = _read_all(source, skip_corrupt=True)
    _only_the_rest_of_the_shard_lost(shards, 0, seen, left_out)


def test_verify_at_a_url_checks_each_shards_sha256_and_presence(shards, tmp_path, capsys):
    out = tmp_path / "s"
    shutil.copytree(shards, out)
    tar = out / "training-000001.tar"
    data = bytearray(tar.read_bytes())
    data[2000] ^= 0xFF  # inside JPEG data: still decodes, only the hash tells
    tar.write_bytes(bytes(data))
    with LoopbackServer(out) as server:
        server.fault("validation-000000.tar", "404")
        code, out, _ = mapdet(capsys, "verify", server.url)
        lines = [ln for ln in out.splitlines() if ln.startswith("PROBLEM")]
        assert code == 1 and "2 split(s)" in out
        assert lines == [
            "PROBLEM training-000001.tar: sha256 differs from the manifest",
            "PROBLEM validation-000000.tar: missing",
        ]
        code, _, err = mapdet(capsys, "verify", server.url + "/nothing")
        assert code == 1 and "no *.manifest.json for training, validation at http://" in err
