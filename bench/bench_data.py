"""Loader throughput: packed shards vs the raw Vistas folder vs bare JPEG decoding (issue 2), and
the same shards streamed over HTTP and through a pipe: command (issue 21: the cost of streaming).

All read the same synthetic images at the same size, in one process, in turn in each round (best
round of each kept), and print JSON lines; the last line holds the ratios. Also compares JPEG decoders. The HTTP
path is the evaluation loader reading http://127.0.0.1:PORT/ from Python's own server
(`python -m http.server`) in a process of its own, as a remote server would be; the pipe path
reads `pipe:cat DIR/{name}`.

    python bench/bench_data.py [--images 200] [--size 1600x1200] [--repeats 3]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image

from mapdet.cli import image_size
from mapdet.data.loaders import eval_loader
from mapdet.datasets.synthetic.writer import SynthConfig, synthesize
from mapdet.datasets.vistas import VistasReader
from mapdet.shards.merge import merge
from mapdet.shards.writer import PackOptions, pack


def _rates(fns: dict, n_images: int, repeats: int) -> dict[str, float]:
    """Images/s of each function, best of ``repeats`` rounds; each round runs every function once,
    in turn, so that a load that comes and goes on a shared machine weighs on all alike."""
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeats):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t)
    return {name: n_images / s for name, s in best.items()}


def _decode_pil(b: bytes) -> torch.Tensor:
    with Image.open(io.BytesIO(b)) as im:
        return torch.from_numpy(np.asarray(im.convert("RGB"))).permute(2, 0, 1)


def _decode_tv(b: bytes) -> torch.Tensor:
    return torchvision.io.decode_jpeg(
        torch.frombuffer(bytearray(b), dtype=torch.uint8), mode=torchvision.io.ImageReadMode.RGB
    )


@contextlib.contextmanager
def _http_server(folder: Path):
    """``http://127.0.0.1:PORT`` serving ``folder`` from a separate process, until the block ends."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", str(folder)]
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                break
            time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.kill()
        server.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--size", type=image_size, default=(1600, 1200), help="synthetic image size WxH")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    w, h = args.size
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = synthesize(Path(tmp) / "raw", "v2.0", n_train=args.images, n_val=0, seed=0, cfg=SynthConfig(size=(w, h)))
        out = Path(tmp) / "shards"
        pack(root, out, "training", PackOptions(samples_per_shard=100, workers=2))
        manifest = merge(out, "training")
        reader = VistasReader(root, "training", source="instances")
        stems = reader.stems()
        jpegs = [(root / "training" / "images" / f"{s}.jpg").read_bytes() for s in stems]
        n = len(stems)
        print(json.dumps({"setup": {"images": n, "size": [w, h], "shards": len(manifest["shards"]), "threads": 1}}))

        decoders = {"torchvision.io.decode_jpeg": _decode_tv, "PIL": _decode_pil}
        rates = _rates({name: lambda f=f: [f(b) for b in jpegs] for name, f in decoders.items()}, n, args.repeats)
        print(json.dumps({"decoders_images_per_s": {k: round(v, 1) for k, v in rates.items()}}))

        def shards(where=out):
            for batch in eval_loader(where, manifest, batch_size=4, workers=0, rank=0, world=1):
                assert len(batch.images) <= 4

        def raw_folder():
            for stem in stems:
                raw = reader.read(stem)  # 16-bit instance PNG -> boxes
                _decode_tv(raw.image_path.read_bytes())

        def bare():
            for b in jpegs:
                _decode_tv(b)

        with _http_server(out) as url:
            loaders = {
                "shards": shards,
                "shards_http": lambda: shards(url),
                "shards_pipe": lambda: shards(f"pipe:cat {out}/{{name}}"),
                "raw_folder": raw_folder,
                "bare_decode": bare,
            }
            r = _rates(loaders, n, args.repeats)
        print(json.dumps({"loader_images_per_s": {k: round(v, 1) for k, v in r.items()}}))
        print(
            json.dumps(
                {
                    "ratios": {
                        "shards_vs_raw_folder": round(r["shards"] / r["raw_folder"], 2),
                        "shards_vs_bare_decode": round(r["shards"] / r["bare_decode"], 3),
                        "http_vs_local_shards": round(r["shards_http"] / r["shards"], 3),
                        "pipe_vs_local_shards": round(r["shards_pipe"] / r["shards"], 3),
                        "goal": "shards >= 5x raw folder, >= 0.85x bare decode",
                    }
                }
            )
        )


if __name__ == "__main__":
    main()
