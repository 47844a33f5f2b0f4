"""The CUDA path: ``pytest -m gpu`` on a GPU machine (``bash bench/gpu_check.sh`` runs it there).

Every test is marked ``gpu`` and skips with a reason when ``torch.cuda.is_available()`` is False, so
the CPU suite collects and skips them. Each takes seconds on a GPU (tiny images and models).

Tolerances, and why they are not exact:
- Kornia on CUDA vs CPU, same seed: every random draw comes from torch's CPU generator on both
  devices (checked: same CPU generator state afterwards, CUDA generator untouched), so the same ops
  run with the same parameters; only float rounding of the warps and colour maths differs between
  the devices' kernels: pixels within 1e-3 (a quarter of one uint8 level), boxes within 1e-3 px.
- ``validate`` on CUDA vs CPU, same weights: cuDNN and the CPU convolutions sum in different orders,
  so scores and boxes differ around 1e-6 relative, and a detection near the score threshold, the
  NMS IoU or the 300 cap can come out differently (TF32 convolutions, PyTorch's default on CUDA,
  round to ~1e-3). At least 90 % of each image's top-50 CPU detections have a CUDA twin (same
  label, IoU >= 0.9, score within 2e-3), and AP and AP50 agree within 0.02 (absolute: a flipped
  match moves one class's AP by about 1/its ground-truth count). Checked on seeded weights (tiny
  shards, detection by detection) and, when MAPDET_TRAINED_RUN names a finished demo, on the
  demo's trained model (AP50 around 0.5, so AP is really compared). The validation loss draws its
  RPN/RoI samples from the device's own generator (CPU and CUDA streams differ), so it agrees only
  within 25 %.
- Checkpoint -> resume on CUDA: not bit-exact. torchvision's roi_align backward has no
  deterministic CUDA kernel (atomicAdd) and cudnn.benchmark (on under ``mapdet train``) may pick
  different algorithms in another process, so two UNBROKEN runs already differ. The resumed run
  must end within max(5 % of how far training moved the weights after the checkpoint, 3 x the
  distance between two unbroken runs) of the unbroken run; a broken resume (lost optimizer state,
  RNG, data position or schedule) lands a large fraction of that movement away.
Measured numbers are printed and, when MAPDET_GPU_REPORT names a file, appended to it as JSON lines.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torchvision.ops import box_iou

from mapdet import comm
from mapdet.config import AugmentConfig, EvalConfig, ModelConfig, OptimConfig
from mapdet.data.augment import BatchAugment
from mapdet.engine.optim import make_optimizer, make_scheduler
from mapdet.engine.step import TrainParts, cuda_speedups, train_step
from mapdet.evaluation.validation import validate
from mapdet.modeling.build import build_inference_model, build_model
from mapdet.shards.manifest import coco_path, load_manifest
from mapdet.structures import Batch
from tests.helpers import REPO, TINY

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)"),
]

CUDA = torch.device("cuda")
CPU = torch.device("cpu")
SMALL = ModelConfig(arch="small", min_size=128, max_size=160)


def report(test: str, **values) -> None:
    line = json.dumps({"test": test, **values})
    print(line)
    if os.environ.get("MAPDET_GPU_REPORT"):
        with open(os.environ["MAPDET_GPU_REPORT"], "a") as f:
            f.write(line + "\n")


def synthetic_batch(seed: int) -> tuple[list[torch.Tensor], list[dict]]:
    """Six uint8 images of three sizes (one portrait) with 6 boxes each, inside the image."""
    g = torch.Generator().manual_seed(seed)
    images, targets = [], []
    for h, w in [(120, 160)] * 3 + [(96, 128)] * 2 + [(160, 120)]:
        images.append(torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8))
        xy = torch.rand(6, 2, generator=g) * torch.tensor([w * 0.8, h * 0.8])
        wh = 3 + torch.rand(6, 2, generator=g) * torch.tensor([w * 0.4, h * 0.4])
        boxes = torch.cat([xy, torch.minimum(xy + wh, torch.tensor([float(w), float(h)]))], dim=1)
        targets.append(
            {
                "boxes": boxes,
                "labels": torch.randint(1, 9, (6,), generator=g),
                "iscrowd": torch.zeros(6, dtype=torch.int64),
                "key": f"k{len(images)}",
            }
        )
    return images, targets


def _to(targets: list[dict], device) -> list[dict]:
    return [{k: v.to(device) if torch.is_tensor(v) else v for k, v in t.items()} for t in targets]


# ---------------------------------------------------------------------------------------- Kornia


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kornia_augmentation_on_cuda_equals_the_cpu_for_the_same_seed(seed):
    images, targets = synthetic_batch(seed)
    augment = BatchAugment(AugmentConfig(vflip=0.5, rot90=0.5))  # every op on (hue too, the default 0.02)
    torch.manual_seed(seed)
    with torch.no_grad():
        cpu_images, cpu_targets = augment(images, targets)
    cpu_state, cuda_state = torch.get_rng_state(), torch.cuda.get_rng_state()
    torch.manual_seed(seed)
    with torch.no_grad():
        gpu_images, gpu_targets = augment.to(CUDA)([im.to(CUDA) for im in images], _to(targets, CUDA))
    assert torch.equal(torch.get_rng_state(), cpu_state), "CUDA drew a different number of CPU random numbers"
    assert torch.equal(torch.cuda.get_rng_state(), cuda_state), "augmentation drew from the CUDA generator"
    px = box = 0.0
    kept = 0
    for a, b, ta, tb in zip(cpu_images, gpu_images, cpu_targets, gpu_targets):
        assert b.is_cuda and b.shape == a.shape
        torch.testing.assert_close(b.cpu(), a, atol=1e-3, rtol=0)
        assert torch.equal(tb["labels"].cpu(), ta["labels"]) and torch.equal(tb["iscrowd"].cpu(), ta["iscrowd"])
        torch.testing.assert_close(tb["boxes"].cpu(), ta["boxes"], atol=1e-3, rtol=0)
        px = max(px, float((b.cpu() - a).abs().max()))
        box = max(box, float((tb["boxes"].cpu() - ta["boxes"]).abs().max()) if len(ta["boxes"]) else 0.0)
        kept += len(ta["boxes"])
    assert kept > 0
    report("kornia_cuda_vs_cpu", seed=seed, max_pixel_diff=px, max_box_diff_px=box, boxes_kept=kept)


# ------------------------------------------------------------------------------- bf16 training


@pytest.fixture
def bf16_accelerator():
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)  # one accelerate state per process
    yield comm.make_accelerator(mixed_precision="bf16")
    AcceleratorState._reset_state(reset_partial_state=True)


def _batches(seed: int = 0):
    while True:
        images, targets = synthetic_batch(seed)
        seed += 1
        yield Batch(images[:4], targets[:4], [])


@pytest.mark.parametrize("arch", ["resnet50_fpn_v2", "mobilenet_v3_large_fpn", "small"])
def test_bf16_training_steps_of_every_arch_on_cuda_have_finite_losses(arch, bf16_accelerator):
    acc = bf16_accelerator
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch=arch, min_size=128, max_size=160), num_classes=9)
    cuda_speedups(model, acc.device)  # as mapdet train: channels-last weights, cudnn.benchmark
    optim_cfg = OptimConfig(lr=0.01, warmup_steps=0)
    optimizer = make_optimizer(model, optim_cfg)
    scheduler = make_scheduler(optimizer, optim_cfg, 10)
    model, optimizer = acc.prepare(model, optimizer)
    conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_cuda and conv.weight.is_contiguous(memory_format=torch.channels_last)
    dtypes = []
    hook = conv.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    before = [p.detach().clone() for p in model.parameters()]
    batches = _batches()
    parts = TrainParts(acc, model, model, optimizer, scheduler, BatchAugment(AugmentConfig()).to(acc.device))
    losses = []
    for _ in range(3):
        res = train_step(parts, batches, OptimConfig(grad_accum=1, clip_norm=10.0))
        assert not res.skipped and all(math.isfinite(v) for v in res.losses.values()), res.losses
        assert math.isfinite(res.grad_norm) and res.images == res.all_images == 4
        losses.append(res.losses["loss"])
    hook.remove()
    assert dtypes and all(d == torch.bfloat16 for d in dtypes), dtypes  # autocast really ran in bf16
    assert any(not torch.equal(b, p.detach()) for b, p in zip(before, model.parameters()))
    assert all(torch.isfinite(p).all() for p in model.parameters())
    report(
        "bf16_step",
        arch=arch,
        losses=[round(x, 4) for x in losses],
        max_mem_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2),
    )


# ------------------------------------------------------------- mapdet train on CUDA, and resume

STEPS, HALF = 20, 10
TRAIN = [
    *TINY,  # later settings win
    "optim.name=adamw",
    "optim.lr=0.003",
    "train.log_every=5",
    "train.image_log_every=0",
    f"train.max_steps={STEPS}",
    f"train.ckpt_every={HALF}",
    "train.keep_last=5",
    "data.val_split=none",
]  # no validation inside training: the tests below validate themselves


def _train(shards: Path, run: Path, *extra: str) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        "mapdet",
        "train",
        "--set",
        f"data.shards={shards}",
        f"train.out={run}",
        *TRAIN,
        *extra,
    ]
    log = open(run.with_suffix(".log"), "w")
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, text=True)


def _finish(proc: subprocess.Popen, run: Path) -> str:
    rc = proc.wait(timeout=240)
    text = run.with_suffix(".log").read_text()
    assert rc == 0, f"mapdet train ({run.name}) exited {rc}:\n{text[-3000:]}"
    return text


@pytest.fixture(scope="module")
def cuda_runs(tmp_path_factory, shards) -> dict[str, Path]:
    """Two unbroken CUDA runs side by side (a, b: their distance is CUDA's run-to-run noise), then a run
    resumed from a's step-10 checkpoint: exactly what a kill after that checkpoint leaves behind."""
    root = tmp_path_factory.mktemp("cuda_runs")
    runs = {name: root / name for name in ("a", "b", "resumed")}
    procs = {name: _train(shards, runs[name]) for name in ("a", "b")}
    for name, proc in procs.items():
        _finish(proc, runs[name])
    half = runs["a"] / "checkpoints" / f"step_{HALF:07d}"
    shutil.copytree(half, runs["resumed"] / "checkpoints" / half.name)
    text = _finish(_train(shards, runs["resumed"], "--resume", "auto"), runs["resumed"])
    assert f"resumed from {runs['resumed'] / 'checkpoints' / half.name} at step {HALF}" in text, text[-3000:]
    return runs


def _distance(a: dict, b: dict) -> float:
    return math.sqrt(sum(float((a[k].double() - b[k].double()).square().sum()) for k in a if a[k].is_floating_point()))


def test_checkpoint_resume_on_cuda_continues_to_the_unbroken_weights(cuda_runs):
    export = {name: load_file(str(run / "export" / "model.safetensors")) for name, run in cuda_runs.items()}
    half = load_file(str(cuda_runs["a"] / "checkpoints" / f"step_{HALF:07d}" / "model.safetensors"))
    a, b, resumed = export["a"], export["b"], export["resumed"]
    assert resumed.keys() == a.keys()
    for k in a:
        if not a[k].is_floating_point():  # BatchNorm step counts: exact
            assert torch.equal(resumed[k], a[k]), k
    moved, noise, off = _distance(a, half), _distance(a, b), _distance(resumed, a)
    tolerance = max(0.05 * moved, 3 * noise)
    report(
        "resume_cuda",
        moved_after_checkpoint=moved,
        unbroken_runs_apart=noise,
        resumed_vs_unbroken=off,
        tolerance=tolerance,
        bit_identical=off == 0.0,
        unbroken_runs_bit_identical=noise == 0.0,
    )
    assert moved > 0
    assert off <= tolerance, (
        f"resumed run ends {off:.3g} from the unbroken one; training moved the weights {moved:.3g} "
        f"after the checkpoint and two unbroken runs end {noise:.3g} apart"
    )


def _twins(cpu, gpu, top: int = 50) -> tuple[int, int]:
    """(CPU top-``top`` detections per image with a CUDA twin, how many were looked for)."""
    found = total = 0
    for image_id in sorted(set(cpu.image_id.tolist())):
        a = cpu.image_id == image_id
        b = gpu.image_id == image_id
        order = cpu.scores[a].argsort()[::-1][:top]
        boxes_a, scores_a, labels_a = (torch.from_numpy(x[a][order]) for x in (cpu.boxes, cpu.scores, cpu.labels))
        boxes_b, scores_b, labels_b = (torch.from_numpy(x[b]) for x in (gpu.boxes, gpu.scores, gpu.labels))
        total += len(order)
        if not len(boxes_b):
            continue
        iou = box_iou(boxes_a, boxes_b)
        close = (scores_a[:, None] - scores_b[None, :]).abs() <= 2e-3
        same = (labels_a[:, None] == labels_b[None, :]) & (iou >= 0.9) & close
        found += int(same.any(dim=1).sum())
    return found, total


def _validate_both(model, cfg: EvalConfig, shards, split: str) -> dict:
    manifest = load_manifest(shards, split)
    gt = json.loads(coco_path(shards, split).read_text())
    out = {
        name: validate(model.to(device), device, cfg, shards, manifest, gt)
        for name, device in (("cpu", CPU), ("cuda", CUDA))
    }
    assert out["cuda"].images == out["cpu"].images == manifest["num_samples"]
    return out


def _compare(test: str, results: dict, **context) -> tuple[dict, dict, int, int]:
    cpu, gpu = results["cpu"], results["cuda"]
    sc, sg = cpu.result.summary(), gpu.result.summary()
    found, total = _twins(cpu.detections, gpu.detections)
    report(
        test,
        **context,
        AP_cpu=sc["AP"],
        AP_cuda=sg["AP"],
        AP50_cpu=sc["AP50"],
        AP50_cuda=sg["AP50"],
        detections_cpu=len(cpu.detections.scores),
        detections_cuda=len(gpu.detections.scores),
        top50_with_cuda_twin=found / max(total, 1),
        val_loss_cpu=cpu.loss.get("loss"),
        val_loss_cuda=gpu.loss.get("loss"),
    )
    assert total > 0 and found >= 0.9 * total, f"only {found} of {total} top CPU detections have a CUDA twin"
    assert abs(sc["AP"] - sg["AP"]) <= 0.02 and abs(sc["AP50"] - sg["AP50"]) <= 0.02, (sc, sg)
    if cpu.loss:
        assert math.isfinite(gpu.loss["loss"]) and abs(gpu.loss["loss"] - cpu.loss["loss"]) <= 0.25 * cpu.loss["loss"]
    return sc, sg, found, total


def test_validate_on_cuda_gives_the_cpu_detections_for_the_same_weights(shards):
    """Seeded weights on the tiny shards: every device-dependent step of inference (convolutions, RPN
    top-k and NMS, RoIAlign, box decoding, score threshold, final NMS and cap) is compared detection
    by detection. Untrained weights score every box about alike, so their AP is ~0 on both devices:
    the trained comparison below checks AP itself."""
    torch.manual_seed(0)
    model = build_inference_model(SMALL, len(load_manifest(shards, "training")["classes"]) + 1)
    results = _validate_both(model, EvalConfig(batch_size=3, workers=0, max_dets=[100, 300]), shards, "training")
    _compare("validate_cuda_vs_cpu_seeded_weights", results, split="training")


TRAINED = os.environ.get("MAPDET_TRAINED_RUN")  # a finished `mapdet demo --out DIR` (bench/gpu_check.sh sets it)


@pytest.mark.skipif(
    not (TRAINED and (Path(TRAINED) / "run" / "export" / "model.safetensors").exists()),
    reason="set MAPDET_TRAINED_RUN to a finished `mapdet demo --out DIR` folder "
    "(bench/gpu_check.sh does, after its demo)",
)
def test_a_trained_model_validates_on_cuda_to_the_cpu_ap():
    from mapdet.config import load_config

    run = Path(TRAINED)
    cfg = load_config(run / "run" / "config.yaml")
    shards = Path(cfg.data.shards)
    manifest = load_manifest(shards, cfg.data.val_split)
    model = build_inference_model(cfg.model, len(manifest["classes"]) + 1)
    model.load_state_dict(load_file(str(run / "run" / "export" / "model.safetensors")))
    results = _validate_both(model, cfg.eval, shards, cfg.data.val_split)
    sc, _, _, _ = _compare("validate_cuda_vs_cpu_trained_demo", results, run=str(run))
    assert sc["AP50"] > 0.05, (
        f"the demo's model is barely trained (AP50 {sc['AP50']:.3f}): the AP comparison means little"
    )


# ------------------------------------------------ fewer host syncs: the CUDA paths of modeling/


def test_the_rpn_on_cuda_keeps_torchvisions_proposals_with_one_nms_per_image():
    """ProposalNetwork on CUDA takes its one-NMS-per-image path; torchvision's RPN on CUDA loops over
    the levels above 5000 boxes. Same kept boxes per image (as sets: CUDA's NMS sort is not stable)."""
    from torchvision.models.detection.rpn import RegionProposalNetwork

    from mapdet.modeling.proposals import rpn_like

    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="resnet50_fpn_v2", min_size=800, max_size=1333), num_classes=9).to(CUDA)
    ours, stock = model.rpn.train(), rpn_like(model.rpn, RegionProposalNetwork).train()
    g = torch.Generator().manual_seed(0)
    levels = [12000, 3000, 750, 200, 50]  # 2000 per level after top-n: 6000 boxes, torchvision's vanilla path
    xy = torch.rand(2, sum(levels), 2, generator=g) * 1200
    boxes = torch.cat([xy, xy + 8 + torch.rand(2, sum(levels), 2, generator=g) * 200], dim=2).to(CUDA)
    logits = torch.randn(2 * sum(levels), 1, generator=g).to(CUDA)
    shapes = [(800, 1333), (1333, 800)]
    got, _ = ours.filter_proposals(boxes, logits, shapes, levels)
    want, _ = stock.filter_proposals(boxes, logits, shapes, levels)
    for a, b in zip(got, want):
        assert len(a) == len(b) > 1000
        assert sorted(a.tolist()) == sorted(b.tolist())
    report("rpn_cuda_vs_torchvision", boxes_kept=[len(a) for a in got])


def test_the_samplers_on_cuda_draw_torchvisions_masks():
    from torchvision.models.detection._utils import BalancedPositiveNegativeSampler

    from mapdet.modeling.sampling import BatchedSampler

    g = torch.Generator().manual_seed(0)
    labels = [torch.randint(-1, 3, (n,), generator=g).to(CUDA) for n in (5000, 300, 0)]
    torch.manual_seed(3)
    ours = BatchedSampler(256, 0.5)(labels)
    torch.manual_seed(3)
    want = BalancedPositiveNegativeSampler(256, 0.5)(labels)
    for a, b in zip(ours[0] + ours[1], want[0] + want[1]):
        assert a.is_cuda and torch.equal(a, b)


def test_a_bf16_training_step_on_cuda_syncs_a_few_times_per_image(bf16_accelerator):
    """The syncs CUDA itself reports (sync debug mode) and those the counter finds on device tensors,
    for a training step of R50-FPN v2 on 4 images: about 2 per image (NMS, plus the pooler's levels
    and the one read-backs per batch), against about 21 per image in torchvision's detector."""
    import warnings

    from mapdet.host_syncs import count_host_syncs

    acc = bf16_accelerator
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="resnet50_fpn_v2", min_size=512, max_size=683), num_classes=9)
    cuda_speedups(model, acc.device)
    optim_cfg = OptimConfig(lr=0.01, warmup_steps=0)
    optimizer = make_optimizer(model, optim_cfg)
    model, optimizer = acc.prepare(model, optimizer)
    parts = TrainParts(
        acc,
        model,
        model,
        optimizer,
        make_scheduler(optimizer, optim_cfg, 10),
        BatchAugment(AugmentConfig()).to(acc.device),
    )
    batches = _batches()
    train_step(parts, batches, OptimConfig(grad_accum=1, clip_norm=10.0))  # warm-up: cuDNN's choices
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught, count_host_syncs(device_only=True) as syncs:
            warnings.simplefilter("always")
            train_step(parts, batches, OptimConfig(grad_accum=1, clip_norm=10.0))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    reported = sum("synchronizing" in str(w.message) for w in caught)
    report("syncs_per_step_cuda", images=4, counted=syncs.total, cuda_debug_mode=reported, sites=syncs.by_site())
    assert syncs.total <= 4 * 2 + 8, syncs.by_site()
    assert reported <= 4 * 2 + 20, reported
