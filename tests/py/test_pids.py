"""pids.signal_if: a process found by number is signalled only while it still is the one found
(numbers are reused: a tenant's deletion once SIGKILLed an unrelated program)."""

from __future__ import annotations

import signal
import subprocess

from netkernel import pids


def test_signals_the_process_while_it_is_still_ours() -> None:
    p = subprocess.Popen(["sleep", "30"])
    try:
        assert pids.signal_if(p.pid, signal.SIGKILL, lambda _pid: True)
        assert p.wait(5) == -signal.SIGKILL
    finally:
        p.kill()
        p.wait()


def test_leaves_a_process_that_is_no_longer_ours() -> None:
    p = subprocess.Popen(["sleep", "30"])
    try:
        assert not pids.signal_if(p.pid, signal.SIGKILL, lambda _pid: False)
        assert p.poll() is None
    finally:
        p.kill()
        p.wait()
