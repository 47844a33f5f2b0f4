"""mapdet.engine.preemption: a signal asks for a checkpoint while training; after a failure the
default actions are back, so the launcher's SIGTERM ends a rank that is only exiting."""

from __future__ import annotations

import signal

from mapdet.engine import preemption


def test_install_then_uninstall():
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        preemption.install()
        assert all(signal.getsignal(sig) is preemption._on_signal for sig in before)
        preemption.uninstall()
        assert all(signal.getsignal(sig) == signal.SIG_DFL for sig in before)
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)
