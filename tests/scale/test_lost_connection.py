"""Issue 16 item 6: once, in a tenant running a large socket test suite, a client that bound an
explicit source port and connected over the tenant's loopback was never accepted. This loops
the pattern (bind a source port, connect, accept, a message each way, close) thousands of
times with socket churn beside it: natively, over the tenant's loopback and through its NSM.
NK_LOST_ROUNDS sets the rounds (a long run: NK_LOST_ROUNDS=100000).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "apps"))
from apputil import PY, log_tail  # noqa: E402

PROG = Path(__file__).resolve().parent / "progs" / "bind_connect_loop.py"
ROUNDS = int(os.environ.get("NK_LOST_ROUNDS", "2000"))


def loop(host: Any, listen: str, connect: str) -> str:
    r = host.run([PY, str(PROG), listen, connect, str(ROUNDS)], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, f"{r.stdout}{r.stderr}\n{log_tail()}"
    return r.stdout.strip().splitlines()[-1]


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_bind_connect_accept_never_loses_a_connection(tenant: Any, peer_ns: Any, family: str) -> None:
    lo = "127.0.0.1" if family == "ipv4" else "::1"
    native = loop(peer_ns(), lo, lo)
    assert native.startswith(f"rounds={ROUNDS} lost=0"), native
    t = tenant(f"lost{family[-1]}")
    over_loopback = loop(t, lo, lo)
    assert over_loopback.startswith(f"rounds={ROUNDS} lost=0"), over_loopback
    own = t.ipv4 if family == "ipv4" else t.ipv6
    through_nsm = loop(t, own, own)
    assert through_nsm.startswith(f"rounds={ROUNDS} lost=0"), through_nsm
