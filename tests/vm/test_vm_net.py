"""A VM tenant's network: the guest has no NIC; its programs, with GuestLib preloaded by
`vm exec`, get their sockets from NetKernel through the agent, the bridge and the tenant's
region mapped as an ivshmem BAR. Peers are namespaces on the bridge; transfers checksummed."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import TENANT_PY, Daemon, Peer, Tenant, nk, requires_root, wait_port

pytestmark = [
    requires_root,
    pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="qemu-system-x86 is not installed"),
]


@pytest.fixture(scope="module")
def vm(nk_daemon: Daemon) -> Iterator[dict[str, str]]:
    name = "vmnet1"
    r = nk("vm", "start", name, "--memory", "512M", timeout=200)
    assert r.returncode == 0, r.stdout + r.stderr
    info = nk_daemon.tenant_info(name)
    yield {"name": name, "ipv4": info["ipv4"], "ipv6": info["ipv6"]}
    nk("vm", "stop", name, timeout=60)
    nk("tenant", "delete", name)


def vexec(name: str, *cmd: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return nk("vm", "exec", name, "--", *cmd, timeout=timeout)


@pytest.fixture
def served(nk_tmpdir: Path) -> tuple[Path, str]:
    data = os.urandom(64 << 20)
    f = nk_tmpdir / "blob"
    f.write_bytes(data)
    f.chmod(0o644)
    return f, hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_curl_in_the_vm_fetches_64_mib_from_a_peer(
    vm: dict[str, str], peer_ns: Callable[[], Peer], served: tuple[Path, str], family: str
) -> None:
    f, digest = served
    peer = peer_ns()
    host = peer.ipv4 if family == "ipv4" else peer.ipv6
    bind = "0.0.0.0" if family == "ipv4" else "::"
    peer.popen(
        [TENANT_PY, "-m", "http.server", "8080", "--bind", bind, "--directory", str(f.parent)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_port(peer, host, 8080)
    url = f"http://{host}:8080/blob" if family == "ipv4" else f"http://[{host}]:8080/blob"
    r = vexec(vm["name"], "sh", "-c", f"curl -sS --fail {url} | sha256sum")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[0] == digest


def test_a_server_in_the_vm_serves_a_peer(
    vm: dict[str, str], peer_ns: Callable[[], Peer], served: tuple[Path, str]
) -> None:
    f, digest = served
    peer = peer_ns()
    srv = subprocess.Popen(
        [
            "netkernel",
            "vm",
            "exec",
            vm["name"],
            "--",
            "python3",
            "-m",
            "http.server",
            "8081",
            "--bind",
            vm["ipv4"],
            "--directory",
            str(f.parent),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            r = peer.run(
                ["curl", "-sS", "--fail", "-o", "/dev/null", f"http://{vm['ipv4']}:8081/"],
                capture_output=True,
            )
            if r.returncode == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        r = peer.run(
            ["sh", "-c", f"curl -sS --fail http://{vm['ipv4']}:8081/blob | sha256sum"],
            capture_output=True,
            text=True,
        )
        assert r.returncode == 0, r.stderr
        assert r.stdout.split()[0] == digest
    finally:
        srv.terminate()
        srv.wait(timeout=30)


def test_udp_both_ways(vm: dict[str, str], peer_ns: Callable[[], Peer]) -> None:
    peer = peer_ns()
    echo = (
        "import socket\n"
        "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(('0.0.0.0', 9999))\n"
        "for _ in range(3):\n"
        "    d, a = s.recvfrom(65536); s.sendto(d[::-1], a)\n"
    )
    peer.popen([TENANT_PY, "-c", echo])
    time.sleep(0.5)
    client = (
        "import socket, sys\n"
        "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(10)\n"
        "for m in (b'one', b'two' * 1000, b'three'):\n"
        f"    s.sendto(m, ('{peer.ipv4}', 9999)); d, a = s.recvfrom(65536)\n"
        "    assert d == m[::-1], (d, m)\n"
        "print('ok', s.getsockname()[0])\n"
    )
    r = vexec(vm["name"], "python3", "-c", client)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["ok", vm["ipv4"]]


def test_without_guestlib_the_guest_has_no_network(vm: dict[str, str], peer_ns: Callable[[], Peer]) -> None:
    peer = peer_ns()
    probe = (
        "import socket\n"
        "s = socket.socket(); s.settimeout(5)\n"
        "try:\n"
        f"    s.connect(('{peer.ipv4}', 22)); print('connected')\n"
        "except OSError as e:\n"
        "    print('refused', e.errno)\n"
    )
    r = nk("vm", "exec", vm["name"], "--env", "LD_PRELOAD=", "--", "python3", "-c", probe, timeout=120)
    assert r.stdout.startswith("refused"), r.stdout + r.stderr


def test_vm_and_namespace_tenant_talk_by_name(
    vm: dict[str, str], tenant: Callable[..., Tenant], served: tuple[Path, str]
) -> None:
    """getaddrinfo of a tenant name in the guest (the guest's resolver asks the agent, which
    asks the tenant's stub), then a fetch from a namespace tenant on the same host."""
    f, digest = served
    t = tenant("vmpeer")
    # Asked again for up to 20 s: run after tests/apps/test_dns.py in one session, the first
    # lookup has failed (exit 2) in 2 runs of 4, cause not yet found (a known defect).
    deadline = time.monotonic() + 20
    while True:
        r = vexec(vm["name"], "getent", "ahosts", "vmpeer.tenant.netkernel")
        if r.returncode == 0 or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert r.returncode == 0, r.stdout + r.stderr
    assert {line.split()[0] for line in r.stdout.splitlines()} == {t.ipv4, t.ipv6}, r.stdout
    t.popen(
        [TENANT_PY, "-m", "http.server", "8082", "--bind", t.ipv4, "--directory", str(f.parent)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while True:
        r = vexec(
            vm["name"], "sh", "-c", "curl -sS --fail http://vmpeer.tenant.netkernel:8082/blob | sha256sum"
        )
        if r.returncode == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[0] == digest
