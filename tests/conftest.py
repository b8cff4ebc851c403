"""Fixtures for the whole suite.

- ``nk_daemon`` (session): `netkernel up` once, `netkernel down` at the end. Needs root and
  the installed package (`pip install .`); skips with a reason when not root.
- ``peer_ns`` (factory): a "remote host" namespace on bridge nk0 (198.19.N.1, fd6e:6b00::ff:N).
- ``tenant`` (factory): a tenant plus helpers to run programs in it.
- ``wait_port(ns, host, port, timeout)``: poll until a TCP port accepts.
- ``nk_tmpdir``: a temp dir, kept when NETKERNEL_KEEP_TMP=1.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from netkernel import netns

NETKERNEL = [sys.executable, "-m", "netkernel"]
# Python for programs that run in a tenant: the system's, which a tenant's unprivileged users
# can reach (an interpreter under /root, as pyenv installs it, they cannot).
TENANT_PY = "/usr/bin/python3" if os.access("/usr/bin/python3", os.X_OK) else sys.executable
KEEP_TMP = os.environ.get("NETKERNEL_KEEP_TMP") == "1"


def is_root() -> bool:
    return os.geteuid() == 0


requires_root = pytest.mark.skipif(not is_root(), reason="needs root (namespaces, links)")


def nk(*args: str, check: bool = False, timeout: float = 120, **kw: Any) -> subprocess.CompletedProcess[str]:
    """Run the `netkernel` CLI; output captured as text."""
    proc = subprocess.run(NETKERNEL + list(args), capture_output=True, text=True, timeout=timeout, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"netkernel {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}"
        )
    return proc


@pytest.fixture
def nk_tmpdir() -> Iterator[Path]:
    """A temp dir tenants can read (its programs' configs, files to serve); to let a tenant
    write there too, grant it: ``t.grant(nk_tmpdir)``."""
    path = Path(tempfile.mkdtemp(prefix="netkernel-test-"))
    path.chmod(0o755)
    yield path
    if KEEP_TMP:
        print(f"\nNETKERNEL_KEEP_TMP: kept {path}")
    else:
        shutil.rmtree(path, ignore_errors=True)


class Daemon:
    """Handle on the session's daemon."""

    def cli(self, *args: str, check: bool = False, **kw: Any) -> subprocess.CompletedProcess[str]:
        return nk(*args, check=check, **kw)

    def up(self, *args: str) -> None:
        nk("up", *args, check=True)

    def down(self) -> None:
        nk("down", check=True)

    def status(self) -> dict[str, Any]:
        return dict(json.loads(nk("status", "--json", check=True).stdout))

    def ps(self) -> list[dict[str, Any]]:
        return list(json.loads(nk("ps", "--json", check=True).stdout)["tenants"])

    def tenant_info(self, name: str) -> dict[str, Any]:
        for t in self.ps():
            if t["name"] == name:
                return t
        raise KeyError(name)


@pytest.fixture(scope="session")
def nk_daemon() -> Iterator[Daemon]:
    if not is_root():
        pytest.skip("nk_daemon needs root: run the suite with sudo (or bash .ci/run)")
    # Start from a clean slate: leftovers of an aborted run would make `up` fail.
    nk("down")
    for name in netns.netns_list():
        if name.startswith("nkp-"):
            _del_peer(name)
    proc = nk("up")
    if proc.returncode != 0:
        pytest.fail(f"netkernel up failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}")
    d = Daemon()
    yield d
    # The daemon restarts an engine that dies, so a crash no test asked for would go unseen
    # (tests that kill it on purpose bring up a fresh daemon afterwards).
    died = engine_restarts()
    nk("down")
    assert died == 0, f"the engine died {died} time(s) during the session (see the daemon's log)"


@pytest.fixture(scope="module")
def fresh_daemon_after(nk_daemon: Daemon) -> Iterator[None]:
    """For tests that kill the engine on purpose: the session's check that it never died,
    and the tests after them, get a fresh daemon."""
    yield
    nk("down")
    proc = nk("up")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def engine_restarts() -> int:
    """How often the daemon restarted a dead engine (0 when it never died); -1: no daemon."""
    proc = nk("status", "--json")
    return int(json.loads(proc.stdout).get("engine_restarts", 0)) if proc.returncode == 0 else -1


def engine_never_died() -> bool:
    """The engine is alive and was never restarted: what tests of hostile input check."""
    proc = nk("status", "--json")
    st = json.loads(proc.stdout) if proc.returncode == 0 else {}
    return bool(st.get("engine_pid")) and st.get("engine_restarts") == 0


def _del_peer(name: str) -> None:
    netns.kill_netns_processes([name])
    subprocess.run(["ip", "netns", "del", name], capture_output=True)
    subprocess.run(["ip", "link", "del", name], capture_output=True)


class Peer:
    """A namespace that plays a remote host on the bridge."""

    def __init__(self, name: str, n: int) -> None:
        self.name = name
        self.ipv4 = f"198.19.{n}.1"
        self.ipv6 = f"fd6e:6b00::ff:{n:x}"
        self.procs: list[subprocess.Popen[Any]] = []

    def _cmd(self, cmd: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.name, *cmd]

    def run(self, cmd: Sequence[str], **kw: Any) -> subprocess.CompletedProcess[Any]:
        kw.setdefault("timeout", 120)
        return subprocess.run(self._cmd(cmd), **kw)

    def popen(self, cmd: Sequence[str], **kw: Any) -> subprocess.Popen[Any]:
        p = subprocess.Popen(self._cmd(cmd), **kw)
        self.procs.append(p)
        return p


_peer_counter = itertools.count(1)


@pytest.fixture
def peer_ns(nk_daemon: Daemon) -> Iterator[Callable[[], Peer]]:
    peers: list[Peer] = []

    def make() -> Peer:
        n = next(_peer_counter)
        p = Peer(f"nkp-{uuid.uuid4().hex[:6]}", n)
        peers.append(p)
        for cmd in (
            ["ip", "netns", "add", p.name],
            ["ip", "-n", p.name, "link", "set", "lo", "up"],
            ["ip", "link", "add", p.name, "type", "veth", "peer", "name", "eth0", "netns", p.name],
            ["ip", "link", "set", p.name, "master", "nk0", "up"],
            ["ip", "-n", p.name, "addr", "add", f"{p.ipv4}/15", "dev", "eth0"],
            ["ip", "-n", p.name, "addr", "add", f"{p.ipv6}/64", "dev", "eth0", "nodad"],
            ["ip", "-n", p.name, "link", "set", "eth0", "up"],
        ):
            subprocess.run(cmd, check=True, capture_output=True)
        return p

    yield make
    for p in peers:
        for proc in p.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        _del_peer(p.name)


class Tenant:
    def __init__(self, name: str, nsm: str | None, daemon: Daemon) -> None:
        self.name = name
        self.nsm = nsm
        args = ["tenant", "create", name] + (["--nsm", nsm] if nsm else [])
        nk(*args, check=True)
        info = daemon.tenant_info(name)
        self.ipv4: str = info["ipv4"]
        self.ipv6: str = info["ipv6"]
        self.netns: str = info["netns"]
        self.uid_base: int = int(info["uid_base"])
        self.procs: list[subprocess.Popen[Any]] = []
        self.rw: list[Path] = []

    def grant(self, path: Path) -> Path:
        """Let the tenant's programs write ``path`` (and what is below): it becomes its root's
        (a host uid of its own) and is passed with --rw to every program it runs."""
        path = Path(path)
        for p in [path, *path.rglob("*")]:
            os.chown(p, self.uid_base, self.uid_base, follow_symlinks=False)
        self.rw.append(path)
        return path

    def _cmd(self, cmd: Sequence[str]) -> list[str]:
        grants = [x for p in self.rw for x in ("--rw", str(p))]
        return NETKERNEL + ["run", "--tenant", self.name, *grants, "--", *cmd]

    def run(self, cmd: Sequence[str], **kw: Any) -> subprocess.CompletedProcess[Any]:
        kw.setdefault("timeout", 120)
        return subprocess.run(self._cmd(cmd), **kw)

    def popen(self, cmd: Sequence[str], **kw: Any) -> subprocess.Popen[Any]:
        p = subprocess.Popen(self._cmd(cmd), **kw)
        self.procs.append(p)
        return p


@pytest.fixture
def tenant(nk_daemon: Daemon) -> Iterator[Callable[..., Tenant]]:
    made: list[Tenant] = []

    def make(name: str, nsm: str | None = None) -> Tenant:
        t = Tenant(name, nsm, nk_daemon)
        made.append(t)
        return t

    yield make
    for t in made:
        nk("tenant", "delete", t.name)  # kills its processes too
        for proc in t.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()


def wait_port(ns: Peer | str | None, host: str, port: int, timeout: float = 10.0) -> None:
    """Poll until ``host:port`` accepts a TCP connection, seen from namespace ``ns``
    (a Peer, a netns name, or None for the root namespace)."""
    name = ns.name if isinstance(ns, Peer) else ns
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if netns.tcp_accepts(name, host, port):
            return
        time.sleep(0.1)
    raise TimeoutError(f"{host}:{port} not accepting after {timeout}s (from {name or 'root ns'})")


@pytest.fixture(name="wait_port")
def wait_port_fixture() -> Callable[..., None]:
    return wait_port
