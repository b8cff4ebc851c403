"""Short connections, many of them: connect, 64-byte request, 64-byte reply, close — the
netkernel-crr loop of `netkernel bench`, 8 threads for a few seconds, the tenant as client of
a peer and of another tenant. The server writes its reply and closes at once, so the reply and
the FIN reach the engine together, and a reader that looks at the ring and then at the EOF
flag may see the flag without the bytes it follows: every one of tens of thousands of replies
must arrive before its end of stream. (A race found this way: ~1 connection in 50,000 read
EOF before its reply.)"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from apputil import describe, stop, uname, wait_line

from netkernel.config import libdir

PORT = 9131
SECONDS = 4
THREADS = 8


@pytest.fixture(scope="module")
def crr() -> Iterator[Path]:
    """netkernel-crr where a tenant's programs may run it: the package may be under /root and
    pytest's directories are root's alone."""
    src = libdir() / "netkernel-crr"
    if not src.exists():
        pytest.fail(f"{src} missing: reinstall with `pip install .`")
    where = Path(tempfile.mkdtemp(prefix="nk-crr-"))
    where.chmod(0o755)
    shutil.copy(src, where / "netkernel-crr")
    (where / "netkernel-crr").chmod(0o755)
    yield where / "netkernel-crr"
    shutil.rmtree(where)


def _check(client: subprocess.CompletedProcess[str], server: subprocess.Popen[bytes]) -> None:
    out, err = stop(server)
    what = describe(client) + describe(server, out, err)
    assert client.returncode == 0, what
    done = re.search(r"^connections (\d+)$", client.stdout, re.M)
    errors = re.search(r"^errors (\d+)$", client.stdout, re.M)
    assert done and errors, what
    # Errors first: their lines (step and errno) say what went wrong.
    assert int(errors[1]) == 0, what
    assert int(done[1]) >= 1000, what


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_short_connections_to_a_peer(family, nk_daemon, tenant, peer_ns, crr) -> None:
    peer = peer_ns()
    t = tenant(uname("crr"))
    addr = peer.ipv4 if family == "ipv4" else peer.ipv6
    server = peer.popen([str(crr), "server", addr, str(PORT)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_line(server, r"^READY")
    client = t.run(
        [str(crr), "client", addr, str(PORT), str(SECONDS), str(THREADS)],
        capture_output=True,
        text=True,
        timeout=SECONDS + 60,
    )
    _check(client, server)


def test_short_connections_tenant_to_tenant(nk_daemon, tenant, crr) -> None:
    a = tenant(uname("crra"))
    b = tenant(uname("crrb"))
    server = a.popen([str(crr), "server", a.ipv4, str(PORT)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_line(server, r"^READY")
    client = b.run(
        [str(crr), "client", a.ipv4, str(PORT), str(SECONDS), str(THREADS)],
        capture_output=True,
        text=True,
        timeout=SECONDS + 60,
    )
    _check(client, server)
