"""nginx (master + 2 workers, epoll, sendfile) in a tenant, loaded by wrk from a peer with
keep-alive and with `Connection: close`, over IPv4 and IPv6; then `nginx -s reload` while
serving, and serving again with the new configuration."""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import pytest
from apputil import (
    PROGS,
    PY,
    describe,
    make_random_file,
    run_checked,
    sha256_file,
    stop,
    uname,
    url_host,
    wait_tenant_idle,
)
from conftest import wait_port

CONF = """\
worker_processes 2;
daemon off;
master_process on;
user root;
pid {d}/nginx.pid;
error_log {d}/error.log info;

events {{
    use epoll;
    worker_connections 1024;
}}

http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 1000000;
    client_body_temp_path {d}/tmp/body;
    proxy_temp_path {d}/tmp/proxy;
    fastcgi_temp_path {d}/tmp/fastcgi;
    uwsgi_temp_path {d}/tmp/uwsgi;
    scgi_temp_path {d}/tmp/scgi;
    types {{ application/octet-stream bin; text/plain txt; }}
    default_type application/octet-stream;

    server {{
        listen 80;
        listen [::]:80;
        root {d}/www;
        location = /version {{ return 200 "{version}\\n"; }}
    }}
}}
"""


class Nginx:
    def __init__(self, runner, d: Path) -> None:
        self.runner = runner
        self.d = d
        self.conf = d / "nginx.conf"
        (d / "tmp").mkdir(exist_ok=True)
        www = d / "www"
        www.mkdir(exist_ok=True)
        d.chmod(0o755)
        www.chmod(0o755)
        self.sha_1k = make_random_file(www / "1k.bin", 1024)
        self.sha_1m = make_random_file(www / "1m.bin", 1024 * 1024)
        self.write_conf("v1")
        if hasattr(runner, "grant"):  # a tenant: nginx writes its pid, logs and temp files there
            runner.grant(d)
        self.proc: subprocess.Popen[str] | None = None

    def write_conf(self, version: str) -> None:
        self.conf.write_text(CONF.format(d=self.d, version=version))

    def cmd(self, *extra: str) -> list[str]:
        return ["nginx", "-p", str(self.d), "-c", str(self.conf), "-e", str(self.d / "error.log"), *extra]

    def start(self) -> None:
        run_checked(self.runner, self.cmd("-t"), timeout=30)
        self.proc = self.runner.popen(self.cmd(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def error_log(self) -> str:
        try:
            return (self.d / "error.log").read_text(errors="replace")[-6000:]
        except OSError:
            return ""

    def stop(self) -> str:
        out = ""
        if self.proc is not None:
            out, _ = stop(self.proc, timeout=15)  # SIGTERM: fast shutdown
        return out or ""


def wrk(peer, url: str, *extra: str, duration: int = 3, conns: int = 16) -> subprocess.CompletedProcess[str]:
    cmd = ["wrk", "-t", "2", "-c", str(conns), "-d", f"{duration}s", "--timeout", "5s", *extra, url]
    return peer.run(cmd, capture_output=True, text=True, timeout=duration + 60)


def check_wrk(proc: subprocess.CompletedProcess[str], ng: Nginx) -> int:
    what = describe(proc) + "\n--- nginx error.log (tail)\n" + ng.error_log()
    assert proc.returncode == 0, what
    m = re.search(r"(\d+) requests in ", proc.stdout)
    assert m and int(m[1]) > 0, what
    assert "Socket errors" not in proc.stdout, what
    assert "Non-2xx" not in proc.stdout, what
    return int(m[1])


def fetch(runner, url: str, out: Path) -> str:
    run_checked(runner, ["curl", "-sS", "--fail", "--max-time", "30", "-o", str(out), url], timeout=60)
    return out.read_bytes().decode(errors="replace")


@pytest.fixture
def nginx_in_tenant(nk_daemon, tenant, peer_ns, nk_tmpdir):
    peer = peer_ns()
    t = tenant(uname("nginx"))
    ng = Nginx(t, nk_tmpdir)
    ng.start()
    try:
        wait_port(peer, t.ipv4, 80, timeout=20)
        wait_port(peer, t.ipv6, 80, timeout=20)
        yield t, peer, ng
    finally:
        out = ng.stop()
        print(out)
    # After nginx (master and workers) exits, the engine holds nothing for the tenant.
    wait_tenant_idle(nk_daemon, t.name)


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
@pytest.mark.parametrize("conn", ["keepalive", "close"])
@pytest.mark.parametrize("size", ["1k", "1m"])
def test_nginx_wrk(size, conn, family, nginx_in_tenant, nk_tmpdir) -> None:
    t, peer, ng = nginx_in_tenant
    addr = t.ipv4 if family == "ipv4" else t.ipv6
    url = f"http://{url_host(addr)}/{size}.bin"
    extra = ["-H", "Connection: close"] if conn == "close" else []
    check_wrk(wrk(peer, url, *extra), ng)
    # The content is intact (sendfile through NetKernel).
    out = nk_tmpdir / "got.bin"
    fetch(peer, url, out)
    assert sha256_file(out) == (ng.sha_1k if size == "1k" else ng.sha_1m), ng.error_log()
    assert ng.proc is not None and ng.proc.poll() is None, ng.error_log()


def test_nginx_reload_while_serving(nginx_in_tenant, nk_tmpdir) -> None:
    t, peer, ng = nginx_in_tenant
    base = f"http://{t.ipv4}"
    assert fetch(peer, f"{base}/version", nk_tmpdir / "v").strip() == "v1"
    # Load with fresh connections while the master re-reads its configuration.
    load = peer.popen(
        [
            "wrk",
            "-t",
            "2",
            "-c",
            "16",
            "-d",
            "4s",
            "--timeout",
            "5s",
            "-H",
            "Connection: close",
            f"{base}/1k.bin",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        time.sleep(1.5)
        ng.write_conf("v2")
        run_checked(t, ng.cmd("-s", "reload"), timeout=30)
        out, err = load.communicate(timeout=60)
    finally:
        stop(load)
    check_wrk(subprocess.CompletedProcess(load.args, load.returncode, out, err), ng)
    # The new workers answer with the new configuration (reload is asynchronous: poll).
    version = ""
    for _ in range(50):
        version = fetch(peer, f"{base}/version", nk_tmpdir / "v").strip()
        if version == "v2":
            break
        time.sleep(0.2)
    assert version == "v2", ng.error_log()
    assert ng.proc is not None and ng.proc.poll() is None, ng.error_log()
    # And they serve load as before, over both families.
    check_wrk(wrk(peer, f"{base}/1k.bin"), ng)
    check_wrk(wrk(peer, f"http://[{t.ipv6}]/1m.bin", "-H", "Connection: close"), ng)


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
@pytest.mark.parametrize("conn", ["keepalive", "close"])
def test_wrk_in_tenant_against_nginx_in_peer(conn, family, tenant, peer_ns, nk_tmpdir) -> None:
    """The other role: wrk (epoll client, many non-blocking connects) inside the tenant."""
    peer = peer_ns()
    t = tenant(uname("wrk"))
    ng = Nginx(peer, nk_tmpdir)
    t.grant(nk_tmpdir)  # curl in the tenant writes there (the peer's nginx is root: it still may)
    ng.start()
    try:
        addr = peer.ipv4 if family == "ipv4" else peer.ipv6
        wait_port(peer, addr, 80, timeout=20)
        extra = ["-H", "Connection: close"] if conn == "close" else []
        check_wrk(wrk(t, f"http://{url_host(addr)}/1k.bin", *extra), ng)
        check_wrk(wrk(t, f"http://{url_host(addr)}/1m.bin", *extra, conns=8), ng)
        # curl keeps one HTTP/1.1 connection for several URLs.
        url = f"http://{url_host(addr)}/1m.bin"
        proc = run_checked(
            t,
            [
                "curl",
                "-sS",
                "--fail",
                "-v",
                "--max-time",
                "60",
                *(x for _ in range(10) for x in ("-o", str(nk_tmpdir / "c.bin"), url)),
            ],
            timeout=90,
        )
        assert proc.stderr.count("Re-using existing connection") >= 9, describe(proc)
        assert sha256_file(nk_tmpdir / "c.bin") == ng.sha_1m
    finally:
        ng.stop()


PROXY_CONF = """\
worker_processes 2;
daemon off;
user root;
pid {d}/nginx.pid;
error_log {d}/error.log info;
events {{ use epoll; worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {d}/tmp/body;
    proxy_temp_path {d}/tmp/proxy;
    fastcgi_temp_path {d}/tmp/fastcgi;
    uwsgi_temp_path {d}/tmp/uwsgi;
    scgi_temp_path {d}/tmp/scgi;
    upstream backend {{ server {backend}; keepalive 16; }}
    server {{
        listen 80;
        listen [::]:80;
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
}}
"""


def test_nginx_reverse_proxy_in_tenant(nk_daemon, tenant, peer_ns, nk_tmpdir) -> None:
    """nginx in the tenant as a client too: it proxies to an nginx backend in a peer
    (non-blocking connects, upstream keep-alive), loaded by wrk from another peer."""
    backend_peer = peer_ns()
    client_peer = peer_ns()
    t = tenant(uname("proxy"))
    (nk_tmpdir / "backend").mkdir()
    backend = Nginx(backend_peer, nk_tmpdir / "backend")
    backend.start()
    front_dir = nk_tmpdir / "front"
    front_dir.mkdir()
    (front_dir / "tmp").mkdir()
    front_dir.chmod(0o755)
    conf = front_dir / "nginx.conf"
    conf.write_text(PROXY_CONF.format(d=front_dir, backend=f"[{backend_peer.ipv6}]:80"))
    t.grant(front_dir)
    cmd = ["nginx", "-p", str(front_dir), "-c", str(conf), "-e", str(front_dir / "error.log")]
    front = t.popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_port(backend_peer, backend_peer.ipv6, 80, timeout=20)
        wait_port(client_peer, t.ipv4, 80, timeout=20)
        out = nk_tmpdir / "via-proxy.bin"
        fetch(client_peer, f"http://{t.ipv4}/1m.bin", out)
        assert sha256_file(out) == backend.sha_1m
        for extra in ([], ["-H", "Connection: close"]):
            check_wrk(wrk(client_peer, f"http://{t.ipv4}/1k.bin", *extra), backend)
        assert front.poll() is None, (front_dir / "error.log").read_text()[-4000:]
    finally:
        stop(front, timeout=15)
        backend.stop()
    wait_tenant_idle(nk_daemon, t.name)


def _abort(runner, host: str) -> None:
    proc = run_checked(runner, [PY, str(PROGS / "abort_client.py"), host, "80", "/1m.bin"], timeout=60)
    assert proc.stdout.strip() == "ABORTED 65536", describe(proc)


def test_aborted_downloads(nginx_in_tenant, nk_daemon, peer_ns, tenant, nk_tmpdir) -> None:
    """Clients that hang up mid-transfer (close with unread data: a reset) on either side:
    nginx in the tenant keeps serving; a tenant whose client hung up holds no sockets after."""
    t, peer, ng = nginx_in_tenant
    for host in (t.ipv4, t.ipv6) * 5:
        _abort(peer, host)
    check_wrk(wrk(peer, f"http://{t.ipv4}/1k.bin", duration=2), ng)
    out = nk_tmpdir / "after.bin"
    fetch(peer, f"http://[{t.ipv6}]/1m.bin", out)
    assert sha256_file(out) == ng.sha_1m
    # Reverse: the client that hangs up is in a tenant, nginx in a peer.
    other = peer_ns()
    back = nk_tmpdir / "peer-nginx"
    back.mkdir()
    ng2 = Nginx(other, back)
    ng2.start()
    c = tenant(uname("abort"))
    (back / "c").mkdir()
    mine = c.grant(back / "c")  # where curl in the tenant writes
    try:
        wait_port(other, other.ipv4, 80, timeout=20)
        for host in (other.ipv4, other.ipv6) * 5:
            _abort(c, host)
        wait_tenant_idle(nk_daemon, c.name)
        proc = run_checked(
            c,
            [
                "curl",
                "-sS",
                "--fail",
                "--max-time",
                "30",
                "-o",
                str(mine / "ok.bin"),
                f"http://{other.ipv4}/1m.bin",
            ],
        )
        assert sha256_file(mine / "ok.bin") == ng2.sha_1m, describe(proc)
    finally:
        ng2.stop()
