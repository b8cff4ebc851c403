"""HTTP with real programs: curl and Python urllib against `python3 -m http.server`, the
tenant as client and as server, over IPv4 and IPv6; a few-MB file compared by sha256."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from apputil import PY, describe, make_random_file, run_checked, sha256_file, stop, uname, url_host
from conftest import wait_port

SIZE = 5 * 1024 * 1024 + 123
PORT = 8000
FAMILIES = ["ipv4", "ipv6"]


@pytest.fixture
def www(nk_tmpdir: Path) -> tuple[Path, str]:
    d = nk_tmpdir / "www"
    d.mkdir()
    d.chmod(0o755)
    nk_tmpdir.chmod(0o755)
    digest = make_random_file(d / "blob.bin", SIZE)
    (d / "hello.txt").write_text("hello from http.server\n")
    return d, digest


def _http_server(runner, bind: str, directory: Path) -> subprocess.Popen[bytes]:
    return runner.popen(
        [PY, "-m", "http.server", str(PORT), "--bind", bind, "--directory", str(directory)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def _peer_addr(peer, family: str) -> str:
    return peer.ipv4 if family == "ipv4" else peer.ipv6


def _curl(out: Path, url: str) -> list[str]:
    return ["curl", "-sS", "--fail", "--connect-timeout", "10", "--max-time", "90", "-o", str(out), url]


@pytest.mark.parametrize("family", FAMILIES)
def test_curl_in_tenant_from_peer_http_server(family, tenant, peer_ns, www, nk_tmpdir) -> None:
    directory, digest = www
    peer = peer_ns()
    t = tenant(uname("http"))
    t.grant(nk_tmpdir)  # curl writes there
    addr = _peer_addr(peer, family)
    server = _http_server(peer, addr, directory)
    try:
        wait_port(peer, addr, PORT)
        out = nk_tmpdir / "got.bin"
        proc = run_checked(t, _curl(out, f"http://{url_host(addr)}:{PORT}/blob.bin"))
        assert out.stat().st_size == SIZE, describe(proc)
        assert sha256_file(out) == digest, describe(proc)
        # A small one, twice on one connection (keep-alive is HTTP/1.0 here: two connections).
        proc = run_checked(
            t,
            [
                "curl",
                "-sS",
                "--fail",
                "--max-time",
                "30",
                f"http://{url_host(addr)}:{PORT}/hello.txt",
                f"http://{url_host(addr)}:{PORT}/hello.txt",
            ],
        )
        assert proc.stdout == "hello from http.server\n" * 2, describe(proc)
    finally:
        stop(server)


@pytest.mark.parametrize("family", FAMILIES)
def test_http_server_in_tenant_curl_from_peer(family, tenant, peer_ns, www, nk_tmpdir) -> None:
    directory, digest = www
    peer = peer_ns()
    t = tenant(uname("http"))
    bind = "0.0.0.0" if family == "ipv4" else "::"
    addr = t.ipv4 if family == "ipv4" else t.ipv6
    server = _http_server(t, bind, directory)
    try:
        wait_port(peer, addr, PORT, timeout=20)
        out = nk_tmpdir / "got.bin"
        proc = run_checked(peer, _curl(out, f"http://{url_host(addr)}:{PORT}/blob.bin"))
        assert out.stat().st_size == SIZE, describe(proc)
        assert sha256_file(out) == digest, describe(proc)
        # Several sequential small requests: each one is a new connection to the listener.
        for _ in range(5):
            proc = run_checked(
                peer,
                ["curl", "-sS", "--fail", "--max-time", "30", f"http://{url_host(addr)}:{PORT}/hello.txt"],
            )
            assert proc.stdout == "hello from http.server\n", describe(proc)
        assert server.poll() is None, describe(server, *stop(server))
    finally:
        stop(server)


URLLIB = r"""
import hashlib, sys, urllib.request
url = sys.argv[1]
with urllib.request.urlopen(url, timeout=60) as r:
    h = hashlib.sha256(); n = 0
    while chunk := r.read(1 << 16):
        h.update(chunk); n += len(chunk)
print(r.status, n, h.hexdigest())
"""


@pytest.mark.parametrize("family", FAMILIES)
def test_urllib_in_tenant(family, tenant, peer_ns, www) -> None:
    directory, digest = www
    peer = peer_ns()
    t = tenant(uname("http"))
    addr = _peer_addr(peer, family)
    server = _http_server(peer, addr, directory)
    try:
        wait_port(peer, addr, PORT)
        proc = run_checked(t, [PY, "-c", URLLIB, f"http://{url_host(addr)}:{PORT}/blob.bin"])
        assert proc.stdout.split() == ["200", str(SIZE), digest], describe(proc)
    finally:
        stop(server)


def test_parallel_downloads_from_tenant(tenant, peer_ns, www, nk_tmpdir) -> None:
    """http.server (one thread per connection) in the tenant; 8 curl processes at once."""
    directory, digest = www
    peer = peer_ns()
    t = tenant(uname("http"))
    server = _http_server(t, "0.0.0.0", directory)
    try:
        wait_port(peer, t.ipv4, PORT, timeout=20)
        procs = [
            peer.popen(
                _curl(nk_tmpdir / f"par{i}.bin", f"http://{t.ipv4}:{PORT}/blob.bin"),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for i in range(8)
        ]
        for i, p in enumerate(procs):
            out, err = p.communicate(timeout=120)
            assert p.returncode == 0, describe(p, out, err)
            assert sha256_file(nk_tmpdir / f"par{i}.bin") == digest, describe(p, out, err)
    finally:
        stop(server)
