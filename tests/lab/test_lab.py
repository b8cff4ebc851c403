"""Several NetKernel hosts on one machine (`netkernel lab`): tenants on different hosts reach
each other through their NSMs and the fabric, by address and by name, and nothing else of the
other hosts; bad lab descriptions are refused with nothing left behind."""

from __future__ import annotations

import hashlib
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import TENANT_PY, nk, requires_root

from netkernel import lab, netns

pytestmark = requires_root


def lab_exec(host: str, *cmd: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return nk("lab", "exec", host, "--", *cmd, timeout=timeout)


def in_tenant(host: str, tenant: str, *cmd: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return lab_exec(host, "netkernel", "run", "--tenant", tenant, "--", *cmd, timeout=timeout)


def nothing_left() -> None:
    assert not [n for n in netns.netns_list() if n.startswith("nklab-")]
    assert not lab.LAB_DIR.exists()


@pytest.fixture(scope="module")
def three_hosts() -> Iterator[None]:
    nk("lab", "down")
    nk("lab", "up", "--hosts", "3", "--link", "h3:rate=400mbit", check=True)
    try:
        yield
    finally:
        r = nk("lab", "down")
        assert r.returncode == 0, r.stdout + r.stderr
        nothing_left()


def serve(host: str, tenant: str, directory: Path, port: int) -> None:
    """A Python HTTP server on all of the tenant's addresses (IPv4 and IPv6)."""
    code = (
        "import functools,http.server,socket,sys\n"
        "class S(http.server.ThreadingHTTPServer):\n"
        "    address_family = socket.AF_INET6\n"
        "    def server_bind(self):\n"
        "        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)\n"
        "        super().server_bind()\n"
        "h = functools.partial(http.server.SimpleHTTPRequestHandler, directory=sys.argv[1])\n"
        "S(('::', int(sys.argv[2])), h).serve_forever()\n"
    )
    script = directory / "serve.py"
    script.write_text(code)
    r = in_tenant(
        host, tenant, "sh", "-c", f"nohup {TENANT_PY} {script} {directory} {port} >/dev/null 2>&1 &"
    )
    assert r.returncode == 0, r.stderr
    deadline = time.time() + 10
    while time.time() < deadline:
        if (
            "LISTEN"
            in lab_exec(
                host, "ip", "netns", "exec", "nk-nsm-kernel", "ss", "-Hltn", f"sport = :{port}"
            ).stdout
        ):
            return
        time.sleep(0.1)
    raise AssertionError(f"no listener on {host}:{port}")


def test_tenants_on_different_hosts_reach_each_other_by_name_and_address(
    three_hosts: None, nk_tmpdir: Path
) -> None:
    blob = os.urandom(8 << 20)
    (nk_tmpdir / "blob").write_bytes(blob)
    want = hashlib.sha256(blob).hexdigest()
    serve("h3", "web", nk_tmpdir, 8080)
    for client_host, tenant in (("h1", "fetch1"), ("h2", "fetch2")):
        for url in (
            "http://web.h3.lab:8080/blob",  # by name, through NetKernel's DNS and h3's
            # By address: h3's first tenant is its subnet's host 256 + 1 (198.18.48.0/20).
            "http://198.18.49.1:8080/blob",
            "http://[fd6e:6b03::1:1]:8080/blob",
        ):
            r = in_tenant(client_host, tenant, "sh", "-c", f"curl -sSf {url} | sha256sum")
            assert r.returncode == 0 and r.stdout.split()[0] == want, (url, r.stdout, r.stderr)
    # The name of a tenant that does not exist is NXDOMAIN, asked of its host.
    r = in_tenant("h1", "fetch1", "getent", "hosts", "nobody.h3.lab")
    assert r.returncode == 2 and not r.stdout


def test_tenants_do_not_reach_other_hosts_services(three_hosts: None) -> None:
    # A service on every address of host h3 itself, as sshd would be.
    holder = subprocess.Popen(
        lab.exec_argv(lab.find(lab.load(), "h3"), [TENANT_PY, "-m", "http.server", "--bind", "::", "9999"]),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 10
        while not netns.tcp_accepts("nklab-h3", "100.64.0.3", 9999) and time.time() < deadline:
            time.sleep(0.1)
        assert netns.tcp_accepts("nklab-h1", "100.64.0.3", 9999)  # the hosts themselves may
        probe = (
            "import socket,sys\n"
            "for a in sys.argv[1:]:\n"
            "    s = socket.socket(socket.AF_INET6 if ':' in a else socket.AF_INET)\n"
            "    s.settimeout(2)\n"
            "    try:\n"
            "        s.connect((a, 9999)); print('REACHED', a)\n"
            "    except OSError as e:\n"
            "        print('refused', a, e)\n"
        )
        # h3's bridge address, its fabric addresses, h1's own fabric address.
        targets = ["198.18.48.1", "fd6e:6b03::1", "100.64.0.3", "fd6e:6bff::3", "100.64.0.1"]
        r = in_tenant("h1", "prober", TENANT_PY, "-c", probe, *targets)
        assert r.returncode == 0, r.stderr
        assert "REACHED" not in r.stdout, r.stdout
        assert r.stdout.count("refused") == len(targets)
    finally:
        holder.kill()
        holder.wait()


def test_overlapping_subnet_is_refused_and_nothing_is_built() -> None:
    nk("lab", "down")
    r = nk("lab", "up", "--hosts", "3", "--subnet", "h2=198.18.16.0/21")
    assert r.returncode != 0
    assert "overlaps host h1's 198.18.16.0/20" in r.stderr, r.stderr
    nothing_left()


def test_link_spec_that_tc_refuses_is_refused_and_nothing_is_built() -> None:
    nk("lab", "down")
    # tbf needs a queue: tc refuses a latency of 0.
    r = nk("lab", "up", "--hosts", "2", "--link", "h2:rate=300mbit,queue=0us")
    assert r.returncode != 0
    assert "tbf" in r.stderr and "h2" in r.stderr, r.stderr
    nothing_left()
    r = nk("lab", "up", "--hosts", "2", "--link", "h2:speed=1gbit")
    assert r.returncode != 0 and "'speed=1gbit' is not KEY=VALUE" in r.stderr, r.stderr
    nothing_left()


def test_lab_cli_mistakes_say_what_to_do() -> None:
    nk("lab", "down")
    r = nk("lab", "exec", "h1", "--", "true")
    assert r.returncode != 0 and "no lab is up" in r.stderr
    r = nk("lab", "up", "--hosts", "1")
    assert r.returncode != 0 and "2 to 8 hosts" in r.stderr
