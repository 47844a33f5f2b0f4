"""fileio.read_json: the parsed content, or one line naming the file that a user can act on."""

from __future__ import annotations

import re

import pytest

from mapdet.fileio import read_json, write_json_atomic


def test_reads_what_was_written(tmp_path):
    record = {"classes": [{"id": 1, "name": "car"}], "scores": [0.5, 1e-3], "big": 2**40, "text": "Größe"}
    write_json_atomic(tmp_path / "r.json", record)
    assert read_json(tmp_path / "r.json", "results") == record
    assert read_json(str(tmp_path / "r.json"), "results") == record  # a str path too


def test_a_missing_file_or_a_folder_is_named(tmp_path):
    with pytest.raises(ValueError, match=f"^ground truth file not found: {re.escape(str(tmp_path / 'gt.json'))}$"):
        read_json(tmp_path / "gt.json", "ground truth")
    with pytest.raises(ValueError, match=f"^results file not found: {re.escape(str(tmp_path))}$"):
        read_json(tmp_path, "results")


@pytest.mark.parametrize("content", [b'[{"image_id": 1,', b"", b"NaN", b"\xff\xfe[]"])
def test_bad_json_is_named_with_the_reason_on_one_line(tmp_path, content):
    (tmp_path / "dt.json").write_bytes(content)
    with pytest.raises(ValueError) as e:
        read_json(tmp_path / "dt.json", "results")
    message = str(e.value)
    assert message.startswith(f"results file {tmp_path / 'dt.json'} is not valid JSON: ") and "\n" not in message
    assert e.value.__cause__ is None and e.value.__suppress_context__  # no parser traceback chained
