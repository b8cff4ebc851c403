"""PostgreSQL in a sandboxed tenant, as a user would run it there: the tenant's root makes
the data directory the postgres user's, and starts initdb and the server through `setpriv`
(postgres refuses to run as root). A client in a peer namespace writes rows and reads back
their checksum; the server's shared memory, semaphores and socket live in the tenant's
private IPC namespace, /dev/shm and granted directory."""

from __future__ import annotations

import glob
import hashlib
import pwd
import shutil
from pathlib import Path
from typing import Any

import pytest
from apputil import describe

from netkernel import netns

BINS = sorted(glob.glob("/usr/lib/postgresql/*/bin"))
pytestmark = pytest.mark.skipif(
    not BINS or shutil.which("psql") is None or shutil.which("setpriv") is None,
    reason="PostgreSQL server, psql and setpriv are needed",
)

START = """set -e
chown postgres:postgres "$1"
as_pg() { setpriv --reuid=postgres --regid=postgres --init-groups "$@"; }
as_pg {bin}/initdb -D "$1/data" --auth=trust -U postgres >"$1/initdb.log"
echo "host all all 0.0.0.0/0 trust" >>"$1/data/pg_hba.conf"
echo "host all all ::/0 trust" >>"$1/data/pg_hba.conf"
as_pg {bin}/pg_ctl -D "$1/data" -l "$1/server.log" -w -t 60 \\
    -o "-c listen_addresses='*' -k $1 -p 5432" start
"""

STOP = """setpriv --reuid=postgres --regid=postgres --init-groups {bin}/pg_ctl -D "$1/data" -m fast -w stop"""


def psql(peer: Any, host: str, sql: str) -> str:
    r = peer.run(
        ["psql", "-h", host, "-U", "postgres", "-d", "postgres", "-Atq", "-c", sql],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, describe(r, r.stdout, r.stderr)
    return r.stdout.strip()


def test_postgres_in_tenant_via_setpriv(tenant: Any, peer_ns: Any, nk_tmpdir: Path) -> None:
    t, peer = tenant("pg"), peer_ns()
    t.grant(nk_tmpdir)
    bin_dir = BINS[-1]
    r = t.run(
        ["sh", "-c", START.replace("{bin}", bin_dir), "start", str(nk_tmpdir)],
        capture_output=True,
        text=True,
        timeout=180,
    )
    log = nk_tmpdir / "server.log"
    assert r.returncode == 0, f"{r.stdout}{r.stderr}\n{log.read_text() if log.exists() else ''}"
    try:
        for host in (t.ipv4, t.ipv6):
            psql(peer, host, "drop table if exists t; create table t (i int, s text)")
            psql(peer, host, "insert into t select i, md5(i::text) from generate_series(1, 20000) i")
            got = psql(peer, host, "select md5(string_agg(s, ',' order by i)) from t")
            want = hashlib.md5(
                ",".join(hashlib.md5(str(i).encode()).hexdigest() for i in range(1, 20001)).encode()
            ).hexdigest()
            assert got == want
        # The server runs as the tenant's postgres user: a host uid of the tenant's range.
        uids = set()
        for pid in netns.pids_in_netns(t.netns):
            status = Path(f"/proc/{pid}/status").read_text()
            if "\nName:\tpostgres" in "\n" + status:
                uids.add(int(status.split("Uid:")[1].split()[0]))
        assert uids == {t.uid_base + pwd.getpwnam("postgres").pw_uid}, uids
    finally:
        t.run(
            ["sh", "-c", STOP.replace("{bin}", bin_dir), "stop", str(nk_tmpdir)],
            capture_output=True,
            timeout=60,
        )
