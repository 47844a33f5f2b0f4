"""The training loop of ``mapdet train``: steps until ``train.max_steps``, logging, checkpoints,
validation, and the decisions to stop (preemption, non-finite losses, too many corrupt samples, a
dead rank). Collective: every rank runs it and every rank takes the same decisions.

Its state is a ``LoopState``: the step, the micro-batches drawn (the training stream resumes after
them) and the job-wide ``Counters``, all written to each checkpoint's meta.json and read back on
resume, so a resumed run decides exactly as an uninterrupted one would.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from mapdet import comm, tracking
from mapdet.config import Config
from mapdet.engine import checkpoint, preemption
from mapdet.engine.step import StepResult, TrainParts, train_step
from mapdet.modeling import run_weights


@dataclass
class Counters:
    """What the whole job has seen, summed over ranks (identical on every rank)."""

    skipped_steps: int = 0  # steps whose update was skipped (non-finite loss on some rank)
    bad_samples: int = 0  # corrupt training samples skipped
    samples: int = 0  # images trained on
    sanitized_boxes: int = 0  # boxes the decoder clipped or dropped
    bad_by_shard: dict[str, int] = field(default_factory=dict)


@dataclass
class LoopState:
    step: int = 0
    batches: int = 0  # micro-batches drawn per rank: where the training stream resumes
    counters: Counters = field(default_factory=Counters)
    nonfinite_in_row: int = 0  # consecutive skipped steps (not checkpointed: a resume starts afresh)

    @classmethod
    def from_meta(cls, meta: dict) -> LoopState:
        return cls(meta["step"], meta["batches"], Counters(**meta["counters"]))

    def meta(self, global_batch: int, processes: int) -> dict:
        return {
            "batches": self.batches,
            "counters": asdict(self.counters),
            "global_batch": global_batch,
            "processes": processes,
        }


class RankFailure(RuntimeError):
    """Another rank died or stopped answering: this rank can only exit (no collective will return)."""


class OutOfMemory(Exception):
    """This rank ran out of CUDA memory; the message names the settings to lower (not a
    RuntimeError, so that nothing mistakes it for a lost peer)."""


def out_of_memory(parts: TrainParts, cfg: Config, state: LoopState, run_dir: Path, validating: bool) -> str:
    """The one line for a CUDA out-of-memory error: where, the settings to lower with their values."""
    data, accum, world = cfg.data, cfg.optim.grad_accum, parts.accelerator.num_processes
    transform = getattr(parts.raw_model, "transform", None)  # the resolved size, also the arch's default
    max_size = getattr(transform, "max_size", cfg.model.max_size)
    where = f"validation after step {state.step}" if validating else f"training step {state.step + 1}"
    if validating:
        per_gpu, lower = f"eval.batch_size={cfg.eval.batch_size}", "lower eval.batch_size"
    elif data.global_batch is not None:
        split = f"{world} process(es) x optim.grad_accum={accum}"
        per_gpu = f"{data.batch_size} (data.global_batch={data.global_batch} / ({split}))"
        lower = "lower data.global_batch, raise optim.grad_accum (the same global batch, fewer images per GPU)"
    else:
        per_gpu = f"data.batch_size={data.batch_size}"
        lower = "lower data.batch_size (raise optim.grad_accum to keep the global batch)"
    last = run_weights.latest(run_dir)
    kept = f"the last checkpoint ({last.name}) is intact" if last else "no checkpoint was written yet"
    return (
        f"[rank {parts.accelerator.process_index}] CUDA out of memory in {where} with {per_gpu} images per GPU "
        f"of up to model.max_size={max_size} px: {lower}, or lower model.max_size; {kept}: rerun with --resume auto"
    )


class SanitizedTally:
    """Passes training batches through, counting the boxes the decoder clipped or dropped (outside
    the image, without area, label outside 1..K) until ``take()``."""

    def __init__(self, batches):
        self.batches, self.count = batches, 0

    def __next__(self):
        batch = next(self.batches)
        self.count += sum(t["sanitized"] for t in batch.targets)
        return batch

    def take(self) -> int:
        n, self.count = self.count, 0
        return n


def train_loop(
    parts: TrainParts,
    batches: SanitizedTally,
    cfg: Config,
    state: LoopState,
    run_dir: Path,
    names: dict[int, str],
    validate: Callable[[int], None] | None,
) -> int:
    """Train from ``state`` to ``cfg.train.max_steps``; returns the exit code (0 done, 1 stopped,
    preemption.EXIT_PREEMPTED). ``validate(step)`` runs at ``train.eval_every`` and at the end.
    Raises ``RankFailure`` when a collective fails because another rank is gone, ``OutOfMemory``
    when this rank ran out of CUDA memory."""
    acc, world, train = parts.accelerator, parts.accelerator.num_processes, cfg.train
    global_batch = world * cfg.data.batch_size * cfg.optim.grad_accum
    bar = tqdm(total=train.max_steps, initial=state.step, desc="train", unit="step", disable=not acc.is_main_process)
    validating = False
    try:
        while state.step < train.max_steps:
            # The step's one all-reduce also carries the sanitised-box tally and the preemption flag
            # (a signal on ANY rank makes every rank checkpoint this step and exit).
            res = train_step(parts, batches, cfg.optim, shared=lambda: (batches.take(), preemption.requested()))
            sanitized, preempt_flags = res.shared
            _advance(state, res, sanitized, cfg.optim.grad_accum, acc)
            bar.update()
            _log(parts, res, state, cfg, names, bar)
            # Ranks must stop together or DDP hangs: every input of the decision is the same on all
            # ranks (the skip flag and the counts are summed over ranks, the bad entries gathered,
            # the counters restored from rank 0's checkpoint), so no rank can decide otherwise.
            stop, preempted = stop_reason(cfg, state), preempt_flags > 0
            periodic = train.ckpt_every and state.step % train.ckpt_every == 0  # 0 = off
            if periodic or state.step == train.max_steps or preempted or stop:
                checkpoint.save(
                    run_dir,
                    state.step,
                    parts.raw_model,
                    parts.optimizer,
                    parts.scheduler,
                    acc.scaler,
                    state.meta(global_batch, world),
                    train.keep_last,
                )
            if preempted:
                return _preempted(acc, run_dir, state.step)
            if stop:
                acc.print(f"stopping at step {state.step}: {stop}")
                return 1
            if validate and (
                state.step == train.max_steps or (train.eval_every and state.step % train.eval_every == 0)
            ):
                validating = True
                validate(state.step)
                validating = False
    except torch.cuda.OutOfMemoryError as e:  # before RuntimeError: it is one
        # No checkpoint now (it is collective, and this rank's step is half done): the last one
        # stays as it was. This rank leaves; its peers fail their next collective at once.
        raise OutOfMemory(out_of_memory(parts, cfg, state, run_dir, validating)) from e
    except RuntimeError as e:
        if not rank_failure(e):
            raise
        raise RankFailure(
            f"[rank {acc.process_index}] stopping at step {state.step}: a collective failed "
            f"({str(e).splitlines()[0][:300]}). Another rank died or did not answer within "
            f"train.timeout_s={train.timeout_s}. Checkpoints up to the last complete one are kept: "
            "rerun with --resume auto"
        ) from e
    finally:
        bar.close()
    return 0


def _advance(state: LoopState, res: StepResult, sanitized: float, grad_accum: int, acc) -> None:
    state.step += 1
    state.batches += grad_accum
    state.nonfinite_in_row = state.nonfinite_in_row + 1 if res.skipped else 0
    state.counters.skipped_steps += res.skipped
    everyone = _count_samples(res, sanitized, state.counters)
    for b in res.bad:
        print(
            f"[rank {acc.process_index}] skipped bad sample in {b['shard']} ({b['key']}): {b['reason']}",
            file=sys.stderr,
        )
    if everyone:
        acc.print(
            f"step {state.step}: {sum(b.get('samples', 1) for b in everyone)} corrupt sample(s) skipped; "
            f"so far per shard: {_per_shard(state.counters)}"
        )


def _count_samples(res: StepResult, sanitized: float, counters: Counters) -> list[dict]:
    """Add the images, sanitised boxes and corrupt samples of this step on ALL ranks to ``counters``
    (so every rank takes the same stop decision and TensorBoard shows the whole job); returns every
    rank's bad entries. The counts were summed over ranks in the step's all-reduce (``res.all_*``,
    ``sanitized``); the entries themselves are gathered only in a step where some rank met one."""
    bad = [b for part in comm.all_gather_object(res.bad) for b in part] if res.all_bad > 0 else []
    counters.samples += res.all_images
    counters.sanitized_boxes += round(sanitized)
    for b in bad:
        n = b.get("samples", 1)
        counters.bad_samples += n
        counters.bad_by_shard[b["shard"]] = counters.bad_by_shard.get(b["shard"], 0) + n
    return bad


def _log(parts: TrainParts, res: StepResult, state: LoopState, cfg: Config, names: dict[int, str], bar) -> None:
    acc, step = parts.accelerator, state.step
    if cfg.train.log_every and (step % cfg.train.log_every == 0 or step == 1):  # 0 = off
        tracking.scalars(
            acc, _step_scalars(res, parts.scheduler.get_last_lr()[0], state.counters, acc.num_processes), step
        )
        bar.set_postfix(loss=f"{res.losses['loss']:.3f}")
    if cfg.train.image_log_every and step % cfg.train.image_log_every == 0 and res.last_images is not None:
        shown = res.last_targets[:2]
        tracking.images_with_boxes(
            acc,
            "train/augmented",
            res.last_images[:2],
            [t["boxes"] for t in shown],
            [t["labels"] for t in shown],
            names,
            step,
        )


def _step_scalars(res: StepResult, lr: float, counters: Counters, world: int) -> dict[str, float]:
    values = {f"train/{k}": v for k, v in res.losses.items()}
    values.update(
        {
            "train/lr": lr,
            "train/grad_norm": res.grad_norm,
            "train/images_per_s": res.images * world / max(res.step_time_s, 1e-9),
            "train/step_time_s": res.step_time_s,
            "train/data_wait": res.data_wait_s / max(res.step_time_s, 1e-9),
            "train/skipped_steps": counters.skipped_steps,
            "train/bad_samples": counters.bad_samples,
            "train/sanitized_boxes": counters.sanitized_boxes,
        }
    )
    values.update({f"train/bad_samples/{shard}": n for shard, n in counters.bad_by_shard.items()})
    if torch.cuda.is_available():
        values["train/gpu_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
    return {k: v for k, v in values.items() if math.isfinite(v)}


def _per_shard(counters: Counters) -> str:
    return ", ".join(f"{s} {n}" for s, n in sorted(counters.bad_by_shard.items(), key=lambda x: -x[1]))


def stop_reason(cfg: Config, state: LoopState) -> str:
    """Why training must stop now ("" to go on): too many non-finite steps in a row, or too many
    corrupt samples."""
    c, train = state.counters, cfg.train
    if state.nonfinite_in_row >= train.max_nonfinite:
        return (
            f"{state.nonfinite_in_row} steps in a row had a non-finite loss (train.max_nonfinite="
            f"{train.max_nonfinite}); lower optim.lr, raise optim.warmup_steps or set optim.clip_norm"
        )
    seen = c.samples + c.bad_samples
    if seen >= 50 and c.bad_samples > train.max_bad_samples * seen:
        return (
            f"{c.bad_samples} of {seen} training samples were corrupt, above train.max_bad_samples="
            f"{train.max_bad_samples} (per shard: {_per_shard(c)}); run `mapdet verify {cfg.data.shards}` "
            "and repack the shards it names"
        )
    return ""


def _preempted(acc, run_dir: Path, step: int) -> int:
    acc.print(
        f"preempted ({preemption.reason() or 'signal on another rank'}): checkpoint at step {step} written; "
        f"exiting {preemption.EXIT_PREEMPTED}"
    )
    if acc.is_main_process:
        preemption.write_marker(run_dir, step)
    return preemption.EXIT_PREEMPTED


# What gloo's plain RuntimeErrors say when a peer is gone or silent. Which one a survivor meets
# depends on the collective it waits in: DDP's buffer broadcast before a forward reports only
# "Application timeout caused pair closure", without naming gloo.
PEER_LOST = ("gloo", "pair closure", "connection closed by peer", "connection reset by peer", "timed out")


def rank_failure(e: RuntimeError) -> bool:
    """A collective that failed because a peer died or timed out."""
    text = str(e).lower()
    return isinstance(e, torch.distributed.DistError) or any(m in text for m in PEER_LOST)


def check_replicas(acc, raw_model) -> None:
    """DDP keeps every rank's weights identical; say so, or fail loudly if they drifted.

    Parameters only: BatchNorm running statistics are updated locally by the last forward pass
    (DDP re-broadcasts rank 0's buffers at the start of each forward), and rank 0's are exported.
    """
    with torch.no_grad():
        total = float(sum(p.double().sum() for p in raw_model.parameters()))
    sums = comm.all_gather_object(total)
    if len(set(sums)) > 1:
        raise RuntimeError(f"model weights differ across ranks (checksums {sums}): DDP replicas diverged")
    acc.print(f"weights identical on all {len(sums)} rank(s) (checksum {sums[0]:.6f})")
