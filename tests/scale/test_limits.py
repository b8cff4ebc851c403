"""A server at its socket limit: accept() fails as Linux's does when a process runs out of
descriptors (EMFILE), the waiting connections stay queued until the server closes some, and
nothing is lost. Run natively first (RLIMIT_NOFILE in a plain namespace), then in a tenant
whose max_sockets is the limit.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "apps"))
from apputil import LOG, PY, log_tail, stop  # noqa: E402
from conftest import nk  # noqa: E402

PROGS = Path(__file__).resolve().parent / "progs"
CLIENTS = 80
PORT = 7700


def serve_and_connect(server_host: Any, server_ip: str, client_host: Any, *limit: str) -> tuple[str, str]:
    """accept_limit.py on server_host, CLIENTS connections to it from client_host; returns both
    programs' result lines."""
    server = server_host.popen(
        [PY, str(PROGS / "accept_limit.py"), str(PORT), str(CLIENTS), *limit],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        ready = server.stdout.readline().strip()
        assert ready == "READY", server.stderr.read() if server.stderr else ""
        client = client_host.run(
            [PY, str(PROGS / "connect_many.py"), server_ip, str(PORT), str(CLIENTS)],
            capture_output=True,
            text=True,
        )
        assert client.returncode == 0, client.stderr
        out, err = server.communicate(timeout=60)
        assert server.returncode == 0, out + err
        return out.strip().splitlines()[-1], client.stdout.strip()
    finally:
        if server.poll() is None:
            stop(server)


def test_accept_at_the_limit_fails_with_emfile_like_linux(tenant: Any, peer_ns: Any) -> None:
    server_ns, client_ns = peer_ns(), peer_ns()
    # Natively: a process allowed 55 descriptors holds about 50 connections.
    native = serve_and_connect(server_ns, server_ns.ipv4, client_ns, "55")
    assert native == (f"accepted={CLIENTS} refused=EMFILE", f"connected={CLIENTS} closed={CLIENTS}"), native

    # In a tenant allowed 50 sockets: the same program sees the same thing.
    t = tenant("capped")
    nk("tenant", "set", t.name, "--max-sockets", "50", check=True)
    in_tenant = serve_and_connect(t, t.ipv4, client_ns)
    assert in_tenant == native, f"{in_tenant}\n{log_tail()}"
    log = LOG.read_text(errors="replace")
    assert f"event=accept_refused tenant={t.name} port={PORT} errno=EMFILE" in log, log[-3000:]

    # Another tenant is not held back by the first one's limit, and the capped tenant's
    # listener works again once it holds fewer sockets.
    other = tenant("free")
    assert serve_and_connect(other, other.ipv4, client_ns) == (
        f"accepted={CLIENTS} refused=-",
        f"connected={CLIENTS} closed={CLIENTS}",
    )
    again = serve_and_connect(t, t.ipv4, client_ns)
    assert again == native, again
