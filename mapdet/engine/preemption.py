"""Preemption: SIGTERM or SIGUSR1 asks for one last checkpoint and a clean exit.

The handler only sets a flag. The training step sums it over ranks in its one all-reduce
(``engine.train_step``'s ``shared`` values), so a signal delivered to any single rank makes every rank finish the same
step, write one checkpoint together and exit with ``EXIT_PREEMPTED``. A second signal of the same
kind while the checkpoint is being written is ignored (Slurm may repeat it).

Under ``accelerate launch`` the launcher turns any non-zero worker exit into 1, so the main process
also writes ``RUN/PREEMPTED`` (the step and the signal); slurm/train.sbatch requeues when it finds it.
"""

from __future__ import annotations

import signal
from pathlib import Path

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "try again later"
MARKER = "PREEMPTED"

_received: list[str] = []


def install(signals=(signal.SIGTERM, signal.SIGUSR1)) -> None:
    for sig in signals:
        signal.signal(sig, _on_signal)


def uninstall(signals=(signal.SIGTERM, signal.SIGUSR1)) -> None:
    """The default handlers back (a signal ends the process), for a rank that stops after a failure:
    the launcher's SIGTERM to the ranks still exiting must not wait for its kill timeout (30 s)."""
    for sig in signals:
        signal.signal(sig, signal.SIG_DFL)


def _on_signal(signum, frame) -> None:
    _received.append(signal.Signals(signum).name)


def requested() -> bool:
    return bool(_received)


def reason() -> str:
    return _received[0] if _received else ""


def write_marker(run_dir: str | Path, step: int) -> Path:
    path = Path(run_dir) / MARKER
    path.write_text(f"step {step} signal {reason() or 'unknown'}\n")
    return path


def clear_marker(run_dir: str | Path) -> None:
    (Path(run_dir) / MARKER).unlink(missing_ok=True)
