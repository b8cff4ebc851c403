"""The same probe programs as test_native.py, run inside a NetKernel tenant.

Each program must show Linux's behaviour through GuestLib and the engine: over the tenant's
own loopback (which stays in its namespace) and over its own addresses — by default over the
shared-memory path (a tenant talking to itself), and in a second tenant with that path
switched off, through the NSM's kernel sockets.
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

ADDRS = ["127.0.0.1", "::1", "tenant-v4", "tenant-v6", "tenant-v4-nsm", "tenant-v6-nsm"]


@pytest.fixture(scope="module")
def sem_tenants(nk_daemon: Any) -> Any:
    """The probes' tenant, and one with the shared-memory path off (its own addresses then
    go through the NSM)."""
    from conftest import Tenant, nk

    t = Tenant("sem", None, nk_daemon)
    off = Tenant("semnsm", None, nk_daemon)
    nk("tenant", "set", off.name, "--shm", "off", check=True)
    yield t, off
    nk("tenant", "delete", t.name)
    nk("tenant", "delete", off.name)


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
def test_in_tenant(
    name: str, addr: str, sem_tenants: Any, exes: Callable[[str], Path], request: pytest.FixtureRequest
) -> None:
    if name in KNOWN_GAPS:
        request.applymarker(pytest.mark.xfail(strict=True, reason=KNOWN_GAPS[name]))
    t = sem_tenants[1] if addr.endswith("-nsm") else sem_tenants[0]
    host = {"tenant-v4": t.ipv4, "tenant-v6": t.ipv6}.get(addr.removesuffix("-nsm"), addr)
    wrapper = [sys.executable, "-m", "netkernel", "run", "--tenant", t.name, "--"]
    run_program(exes(name), host, wrapper=wrapper)
