"""Damaging packed shards on purpose, for the fault tests."""

from __future__ import annotations

from pathlib import Path

import webdataset as wds

from mapdet.shards.reader import read_shard


def rewrite(tar: Path, edits: dict[str, dict], extra: list[dict] = (), at: int | None = None) -> None:
    """Rewrite a shard with webdataset's TarWriter, replacing fields of some samples and inserting
    ``extra`` samples at position ``at`` (default: the end)."""
    samples = [{k: v for k, v in s.items() if k in ("__key__", "jpg", "json")} for s in read_shard(tar)]
    at = len(samples) if at is None else at
    with wds.TarWriter(str(tar), encoder=False) as sink:
        for s in [*samples[:at], *extra, *samples[at:]]:
            sink.write({**s, **edits.get(s["__key__"], {})})
