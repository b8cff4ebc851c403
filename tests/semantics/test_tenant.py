"""The same probe programs as test_native.py, run inside a NetKernel tenant.

Each program must show Linux's behaviour through GuestLib and the engine: over the tenant's
own loopback (which stays in its namespace) and over its own addresses (through the NSM).
Where NetKernel knowingly differs from Linux the case is marked xfail(strict=True) with the
reason, so the gap stays visible and the mark must go when it is closed.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from test_native import PROGRAMS, build_program, run_program

# Known gaps, by program: the reason is what differs from Linux.
KNOWN_GAPS = {
    "udp_basic": "an ICMP error on UDP is reported by recv() (ECONNREFUSED), "
    "but the proxy fd cannot show POLLERR",
}

ADDRS = ["127.0.0.1", "::1", "tenant-v4", "tenant-v6"]


@pytest.fixture(scope="module")
def sem_tenant(nk_daemon: Any) -> Any:
    from conftest import Tenant, nk

    t = Tenant("sem", None, nk_daemon)
    yield t
    nk("tenant", "delete", "sem")


@pytest.fixture(scope="module")
def exes(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    out = tmp_path_factory.mktemp("sem-tenant")
    cache: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in cache:
            cache[name] = build_program(name, out)
        return cache[name]

    return get


@pytest.mark.parametrize("addr", ADDRS)
@pytest.mark.parametrize("name", PROGRAMS)
def test_in_tenant(name: str, addr: str, sem_tenant: Any, exes: Callable[[str], Path],
                   request: pytest.FixtureRequest) -> None:
    if name in KNOWN_GAPS:
        request.applymarker(pytest.mark.xfail(strict=True, reason=KNOWN_GAPS[name]))
    host = {"tenant-v4": sem_tenant.ipv4, "tenant-v6": sem_tenant.ipv6}.get(addr, addr)
    wrapper = [sys.executable, "-m", "netkernel", "run", "--tenant", sem_tenant.name, "--"]
    run_program(exes(name), host, wrapper=wrapper)
