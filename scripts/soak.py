#!/usr/bin/env python3
"""A mixed soak of a running NetKernel, with faults; every transfer checksummed.

    sudo python3 scripts/soak.py [--minutes 30] [--json FILE]

Needs `netkernel up` (and nginx, redis-server, redis-cli, iperf3, curl from Debian). Under load
from a peer namespace on the bridge: nginx, redis and iperf3 tenants, a tenant moving bulk
data (sha256 on both ends), a tenant on an lwIP NSM doing the same, and tenants created, used
and deleted in a loop. Meanwhile: the engine is killed twice and upgraded twice, the lwIP
process is killed every few minutes, and a tenant's sender is killed with -9 now and then.

A failed operation is "cut" when a kill happened while it ran (expected: those connections
die), "unexpected" otherwise (an upgrade must cut nothing). Afterwards the soak's tenants and
NSM are removed and the engine's and the daemon's descriptors, the engine's memory and the
namespaces are compared with before. Exit status 0 only with no corrupt transfer, no
unexpected failure, no hang and no leak. docs/operations.md has the figures of a 30-minute run;
tests/robust/test_soak.py runs a short one.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from netkernel import netns, pids
from netkernel.bench.workloads import redis_server

NK = [sys.executable, "-m", "netkernel"]
PY = "/usr/bin/python3"
ENGINE_PID = Path("/run/netkernel/engine.pid")
OP_TIMEOUT = 60  # any one operation; longer is a hang

# Sends SIZE bytes of a seeded pattern to HOST:PORT (or, with "recv", reads them from it) and
# prints "<sha256> <bytes>". The peer end is the same program with "serve".
XFER = r"""
import hashlib, random, socket, sys
mode, host, port, size, tag = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
def pattern(n):
    r = random.Random(n)
    return r.randbytes(1 << 20)
def send(s):
    h = hashlib.sha256(); sent = 0; k = 0
    while sent < size:
        b = pattern(k)[: size - sent]; s.sendall(b); h.update(b); sent += len(b); k += 1
    s.shutdown(socket.SHUT_WR); s.recv(1)
    return h.hexdigest(), sent
def recv(s):
    h = hashlib.sha256(); n = 0
    while True:
        b = s.recv(1 << 20)
        if not b: break
        h.update(b); n += len(b)
    return h.hexdigest(), n
fam = socket.AF_INET6 if ":" in host else socket.AF_INET
if mode == "serve":
    l = socket.socket(fam); l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    l.bind((host, port)); l.listen(16); l.settimeout(120)
    print("READY", flush=True)
    c, _ = l.accept(); c.settimeout(120)
    d, n = recv(c); c.close(); print(d, n, flush=True)
else:
    s = socket.create_connection((host, port), timeout=120)
    d, n = send(s); print(d, n, flush=True)
"""


def expected_digest(size: int) -> str:
    h = hashlib.sha256()
    sent, k = 0, 0
    while sent < size:
        b = random.Random(k).randbytes(1 << 20)[: size - sent]
        h.update(b)
        sent += len(b)
        k += 1
    return h.hexdigest()


def run(cmd: list[str], timeout: float = OP_TIMEOUT, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)


def nk(*args: str, timeout: float = OP_TIMEOUT) -> subprocess.CompletedProcess[str]:
    return run([*NK, *args], timeout=timeout)


def in_tenant(tenant: str, *cmd: str, nsm: str | None = None) -> list[str]:
    return [*NK, "run", "--tenant", tenant, *(["--nsm", nsm] if nsm else []), "--", *cmd]


@dataclass
class Stats:
    ok: int = 0
    cut: int = 0  # failed while a kill happened: expected
    unexpected: int = 0
    corrupt: int = 0
    hung: int = 0
    bytes: int = 0
    connections: int = 0
    errors: list[str] = field(default_factory=list)


class Soak:
    def __init__(self, minutes: float) -> None:
        self.duration = minutes * 60
        self.tag = uuid.uuid4().hex[:5]
        self.peer = f"nks-{self.tag}"
        self.peer4 = "198.19.250.1"
        self.lwip = f"soak{self.tag}"
        self.stop = threading.Event()
        # Kills: (monotonic time, the workloads they cut: None for all, the engine's).
        self.kills: list[tuple[float, set[str] | None]] = []
        self.t0 = time.monotonic()
        self.fault_log: list[tuple[float, str]] = []  # (monotonic time, what) of every fault
        self.faults: dict[str, int] = {
            "engine_killed": 0,
            "engine_upgraded": 0,
            "lwip_killed": 0,
            "tenant_killed": 0,
        }
        self.stats: dict[str, Stats] = {}
        self.lock = threading.Lock()
        self.tmp = Path(tempfile.mkdtemp(prefix="netkernel-soak-"))
        self.tmp.chmod(0o755)
        self.tenants: list[str] = []
        self.procs: list[subprocess.Popen[str]] = []

    # -- outcome of one operation ----------------------------------------------------------
    def outcome(
        self, name: str, started: float, ok: bool, nbytes: int = 0, corrupt: bool = False, why: str = ""
    ) -> None:
        with self.lock:
            s = self.stats.setdefault(name, Stats())
            s.connections += 1
            if corrupt:
                s.corrupt += 1
                s.errors.append(f"corrupt: {why}"[:300])
            elif ok:
                s.ok += 1
                s.bytes += nbytes
            elif any(
                started - 1 <= at <= time.monotonic() + 1 and (cuts is None or name in cuts)
                for at, cuts in self.kills
            ):
                s.cut += 1
            else:
                s.unexpected += 1
                # When, against the faults' times, for whoever looks into it.
                near = ", ".join(f"{what} {at - time.monotonic():+.1f}s" for at, what in self.fault_log[-3:])
                s.errors.append(f"[t={started - self.t0:.1f}s; last faults: {near or 'none'}] {why}"[:400])

    def hung(self, name: str, what: str) -> None:
        with self.lock:
            s = self.stats.setdefault(name, Stats())
            s.hung += 1
            s.errors.append(f"hung: {what}"[:300])

    # -- set-up ----------------------------------------------------------------------------
    def peer_up(self) -> None:
        for cmd in (
            ["ip", "netns", "add", self.peer],
            ["ip", "-n", self.peer, "link", "set", "lo", "up"],
            ["ip", "link", "add", self.peer, "type", "veth", "peer", "name", "eth0", "netns", self.peer],
            ["ip", "link", "set", self.peer, "master", "nk0", "up"],
            ["ip", "-n", self.peer, "addr", "add", f"{self.peer4}/15", "dev", "eth0"],
            ["ip", "-n", self.peer, "link", "set", "eth0", "up"],
        ):
            subprocess.run(cmd, check=True, capture_output=True)

    def in_peer(self, *cmd: str) -> list[str]:
        return ["ip", "netns", "exec", self.peer, *cmd]

    def tenant(self, name: str, nsm: str | None = None) -> dict[str, Any]:
        r = nk("tenant", "create", name, *(["--nsm", nsm] if nsm else []))
        if r.returncode != 0:
            raise SystemExit(f"soak: cannot create tenant {name}: {r.stderr}")
        self.tenants.append(name)
        info = json.loads(nk("ps", "--json").stdout)
        return dict(next(t for t in info["tenants"] if t["name"] == name))

    def serve(self, tenant: str, *cmd: str, nsm: str | None = None) -> subprocess.Popen[str]:
        p = subprocess.Popen(
            in_tenant(tenant, *cmd, nsm=nsm), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True
        )
        self.procs.append(p)
        return p

    def wait_port(self, host: str, port: int, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        probe = f"import socket; socket.create_connection(('{host}', {port}), timeout=2).close()"
        while time.monotonic() < deadline:
            if run(self.in_peer(PY, "-c", probe), timeout=10).returncode == 0:
                return
            time.sleep(0.3)
        raise SystemExit(f"soak: {host}:{port} never accepted")

    # -- workloads -------------------------------------------------------------------------
    def loop(self, name: str, op: Any) -> None:
        while not self.stop.is_set():
            started = time.monotonic()
            try:
                op(name, started)
            except subprocess.TimeoutExpired as e:
                self.hung(name, str(e.cmd)[-200:])
            except Exception as e:  # noqa: BLE001 - a workload's own bug must show, not stop the soak
                self.outcome(name, started, False, why=repr(e))

    def web(self, name: str, started: float) -> None:
        r = subprocess.run(
            self.in_peer("curl", "-sS", "--max-time", "30", f"http://{self.web_ip}/1m.bin"),
            capture_output=True,
            timeout=OP_TIMEOUT,
        )
        ok = r.returncode == 0
        corrupt = ok and hashlib.sha256(r.stdout).hexdigest() != self.web_sha
        self.outcome(
            name, started, ok and not corrupt, len(r.stdout), corrupt, r.stderr.decode(errors="replace")
        )

    def redis(self, name: str, started: float) -> None:
        key, value = f"k{random.randrange(1000)}", uuid.uuid4().hex * 16
        cli = ["redis-cli", "-h", self.redis_ip, "--no-raw"]
        s = run(self.in_peer(*cli, "SET", key, value))
        g = run(self.in_peer(*cli, "GET", key)) if s.returncode == 0 and "OK" in s.stdout else s
        ok = g.returncode == 0 and g is not s
        corrupt = ok and g.stdout.strip().strip('"') != value
        self.outcome(
            name, started, ok and not corrupt, len(value) * 2, corrupt, s.stderr + g.stderr + g.stdout[:80]
        )

    def iperf(self, name: str, started: float) -> None:
        rev = ["-R"] if random.random() < 0.5 else []
        # iperf3's server runs one test at a time and, after each, closes its listening
        # socket and makes a new one (strace: close, then socket/bind/listen). A client that
        # starts meanwhile is refused, told "the server is busy" (it came before the server
        # read the end of the last test) or reset (it sat in the closed listener's queue).
        # Natively that window is a fraction of a millisecond (40 back-to-back tests beside
        # two busy loops: no error); in a tenant each of those calls waits on the engine, and
        # with the soak's load a 30-minute run that started each test a few ms after the last
        # saw 12, 3 and 1 of them. As people run it, tests are started apart.
        time.sleep(0.5)
        started = time.monotonic()
        r = run(self.in_peer("iperf3", "-c", self.iperf_ip, "-t", "3", "-J", *rev), timeout=OP_TIMEOUT)
        try:
            res = json.loads(r.stdout)
            nbytes = int(res["end"]["sum_received"]["bytes"])
        except (ValueError, KeyError):  # iperf3 reports a failed test in its JSON ("error")
            res, nbytes = {}, 0
        ok = r.returncode == 0 and nbytes > 0 and "error" not in res
        self.outcome(name, started, ok, nbytes, why=r.stderr[-200:] + r.stdout[-300:])

    def transfer(
        self, name: str, started: float, tenant: str, port: int, size: int, nsm: str | None = None
    ) -> None:
        """size bytes from tenant to the peer, sha256 on both ends."""
        srv = subprocess.Popen(
            self.in_peer(PY, "-c", XFER, "serve", "0.0.0.0", str(port), str(size), "x"),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert srv.stdout is not None
            if srv.stdout.readline().strip() != "READY":
                raise RuntimeError("the peer's receiver did not start")
            marker = f"soakx-{name}-{uuid.uuid4().hex[:6]}"
            c = run(
                in_tenant(tenant, PY, "-c", XFER, "send", self.peer4, str(port), str(size), marker, nsm=nsm)
            )
            if c.returncode != 0:  # it may never have connected: the receiver would wait on
                srv.kill()
            out, err = srv.communicate(timeout=OP_TIMEOUT)
        finally:
            if srv.poll() is None:
                srv.kill()
                srv.wait()
        sent = c.stdout.split()
        got = out.split()
        ok = c.returncode == 0 and len(sent) == 2 and len(got) == 2
        corrupt = ok and (sent[0] != got[0] or int(got[1]) != size or got[0] != self.digests[size])
        self.outcome(
            name, started, ok and not corrupt, size, corrupt, f"{c.stderr[-200:]} {err[-200:]} {sent} {got}"
        )

    def churn(self, name: str, started: float) -> None:
        t = f"sc{self.tag}{random.randrange(10**6)}"
        if nk("tenant", "create", t).returncode != 0:
            self.outcome(name, started, False, why=f"create {t}")
            return
        try:
            self.transfer(name, started, t, 7604, 1 << 20)
        finally:
            d = nk("tenant", "delete", t)
            if d.returncode != 0:  # a tenant must go whatever the engine is doing
                self.outcome(name, started, False, why=f"delete {t}: {d.stderr}")

    # -- faults ----------------------------------------------------------------------------
    def fault_loop(self) -> None:
        d = self.duration
        plan = [
            (0.2 * d, "engine_kill"),
            (0.4 * d, "upgrade"),
            (0.6 * d, "engine_kill"),
            (0.8 * d, "upgrade"),
        ]
        every_lwip, every_tenant = max(20.0, d / 5), max(15.0, d / 6)
        plan += [(t, "lwip_kill") for t in frange(every_lwip * 0.5, d * 0.95, every_lwip)]
        plan += [(t, "tenant_kill") for t in frange(every_tenant * 0.7, d * 0.95, every_tenant)]
        plan.sort()
        t0 = time.monotonic()
        for at, what in plan:
            if self.stop.wait(max(0.0, t0 + at - time.monotonic())):
                return
            self.fault(what)

    def fault(self, what: str) -> None:
        with self.lock:
            self.fault_log.append((time.monotonic(), what))
        if what == "engine_kill":
            with self.lock:
                self.kills.append((time.monotonic(), None))
            os.kill(int(ENGINE_PID.read_text()), signal.SIGKILL)
            self.faults["engine_killed"] += 1
            time.sleep(1)  # the daemon has a new engine in milliseconds; let clients notice
        elif what == "upgrade":
            r = nk("upgrade", timeout=120)  # cuts nothing: a failure then is unexpected
            if r.returncode != 0:
                self.hung("faults", f"upgrade failed: {r.stderr}")
            self.faults["engine_upgraded"] += 1
        elif what == "lwip_kill":
            with self.lock:
                self.kills.append((time.monotonic(), {"lwip"}))
            self.faults["lwip_killed"] += kill_matching(f"netkernel-lwip.*nsm-{self.lwip}.sock")
        elif what == "tenant_kill":
            with self.lock:
                self.kills.append((time.monotonic(), {"bulk"}))
            self.faults["tenant_killed"] += kill_matching("soakx-bulk")

    # -- leaks -----------------------------------------------------------------------------
    @staticmethod
    def census() -> dict[str, Any]:
        st = json.loads(nk("status", "--json").stdout)
        if not st.get("engine_pid"):
            raise SystemExit(f"soak: no engine runs: {st.get('engine_failed')}")
        engine, daemon = int(st["engine_pid"]), int(st["pid"])
        rss = next(
            int(line.split()[1]) * 1024
            for line in Path(f"/proc/{engine}/status").read_text().splitlines()
            if line.startswith("VmRSS:")
        )
        # Netlink sockets (sock_diag, opened on first use and kept) are counted apart: an
        # engine that had to look for a guest end has one more than a fresh one.
        netlink = {line.split()[-1] for line in Path("/proc/net/netlink").read_text().splitlines()[1:]}
        fds = [os.readlink(f"/proc/{engine}/fd/{fd}") for fd in os.listdir(f"/proc/{engine}/fd")]
        nl = sum(1 for f in fds if f.startswith("socket:[") and f[8:-1] in netlink)
        return {
            "engine_fds": len(fds) - nl,
            "engine_netlink_fds": nl,
            "engine_rss": rss,
            "daemon_fds": len(os.listdir(f"/proc/{daemon}/fd")),
            "namespaces": sorted(run(["ip", "netns", "list"]).stdout.split()[::1]),
            "tenants": sorted(t["name"] for t in json.loads(nk("ps", "--json").stdout)["tenants"]),
        }

    # -- the whole run ---------------------------------------------------------------------
    def main(self) -> dict[str, Any]:
        if nk("status").returncode != 0:
            raise SystemExit("soak: NetKernel is not running (sudo netkernel up)")
        time.sleep(1)
        before = self.census()
        self.peer_up()
        try:
            return self._run(before)
        finally:
            self.teardown()

    def _run(self, before: dict[str, Any]) -> dict[str, Any]:
        www = self.tmp / "www"
        www.mkdir()
        www.chmod(0o755)
        body = os.urandom(1 << 20)
        (www / "1m.bin").write_bytes(body)
        self.web_sha = hashlib.sha256(body).hexdigest()
        conf = self.tmp / "nginx.conf"
        d = self.tmp
        conf.write_text(
            f"worker_processes 2; daemon off; user root; pid {d}/nginx.pid; error_log {d}/error.log;\n"
            "events { use epoll; }\n"
            f"http {{ access_log off; sendfile on; client_body_temp_path {d}/b; proxy_temp_path {d}/p;"
            f" fastcgi_temp_path {d}/f; uwsgi_temp_path {d}/u; scgi_temp_path {d}/s;"
            f" server {{ listen 80; root {www}; }} }}\n"
        )
        self.digests = {n: expected_digest(n) for n in (1 << 20, 16 << 20, 64 << 20)}
        if nk("nsm", "add", self.lwip, "--type", "lwip").returncode != 0:
            raise SystemExit("soak: cannot add an lwIP NSM")
        web, rds, ipf = f"sw{self.tag}", f"sr{self.tag}", f"si{self.tag}"
        bulk, lw = f"sb{self.tag}", f"sl{self.tag}"
        w = self.tenant(web)
        self.web_ip = w["ipv4"]
        self.redis_ip = self.tenant(rds)["ipv4"]
        self.iperf_ip = self.tenant(ipf)["ipv4"]
        self.tenant(bulk)
        self.tenant(lw, self.lwip)
        for q in [self.tmp, *self.tmp.rglob("*")]:  # nginx (the tenant's root) writes there
            os.chown(q, int(w["uid_base"]), int(w["uid_base"]))
        rw = ["--rw", str(self.tmp)]
        subprocess.run(
            [*NK, "run", "--tenant", web, *rw, "--", "nginx", "-t", "-c", str(conf), "-p", str(self.tmp)],
            capture_output=True,
        )
        self.procs.append(
            subprocess.Popen(
                [
                    *NK,
                    "run",
                    "--tenant",
                    web,
                    *rw,
                    "--",
                    "nginx",
                    "-c",
                    str(conf),
                    "-p",
                    str(self.tmp),
                    "-e",
                    str(self.tmp / "error.log"),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
        self.serve(rds, *redis_server(6379))
        self.serve(ipf, "iperf3", "-s")
        for host, port in ((self.web_ip, 80), (self.redis_ip, 6379), (self.iperf_ip, 5201)):
            self.wait_port(host, port)
        workers = {
            "nginx": self.web,
            "redis": self.redis,
            "iperf3": self.iperf,
            "bulk": lambda n, s: self.transfer(n, s, bulk, 7601, 64 << 20),
            "lwip": lambda n, s: self.transfer(n, s, lw, 7602, 16 << 20, nsm=self.lwip),
            "churn": self.churn,
        }
        threads = [threading.Thread(target=self.loop, args=(n, op), daemon=True) for n, op in workers.items()]
        threads.append(threading.Thread(target=self.fault_loop, daemon=True))
        started = time.monotonic()
        for t in threads:
            t.start()
        while time.monotonic() - started < self.duration:
            time.sleep(1)
        self.stop.set()
        for t in threads:
            t.join(OP_TIMEOUT + 30)
            if t.is_alive():
                self.hung("soak", f"worker {t.name} did not stop")
        elapsed = time.monotonic() - started
        self.teardown()
        time.sleep(3)  # sockets of deleted tenants go; a new engine's first sweep
        after = self.census()
        leaks = {
            "engine_fds": after["engine_fds"] - before["engine_fds"],
            "daemon_fds": after["daemon_fds"] - before["daemon_fds"],
            "namespaces": sorted(set(after["namespaces"]) - set(before["namespaces"])),
            "tenants": sorted(set(after["tenants"]) - set(before["tenants"])),
        }
        totals = Stats()
        for s in self.stats.values():
            for k in ("ok", "cut", "unexpected", "corrupt", "hung", "bytes", "connections"):
                setattr(totals, k, getattr(totals, k) + getattr(s, k))
        leaked = bool(
            leaks["engine_fds"] > 0 or leaks["daemon_fds"] > 0 or leaks["namespaces"] or leaks["tenants"]
        )
        passed = totals.corrupt == 0 and totals.unexpected == 0 and totals.hung == 0 and not leaked
        return {
            "passed": passed,
            "seconds": round(elapsed, 1),
            "faults": self.faults,
            "totals": asdict(totals) | {"errors": []},
            "workloads": {n: asdict(s) | {"errors": s.errors[:5]} for n, s in self.stats.items()},
            "before": before,
            "after": after,
            "leaks": leaks,
            "engine_rss_growth": after["engine_rss"] - before["engine_rss"],
        }

    def teardown(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for t in self.tenants:
            nk("tenant", "delete", t)
        self.tenants = []
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        self.procs = []
        nk("nsm", "remove", self.lwip)
        if self.peer in run(["ip", "netns", "list"]).stdout:
            netns.kill_netns_processes([self.peer], grace=1.0)
            subprocess.run(["ip", "netns", "del", self.peer], capture_output=True)
            subprocess.run(["ip", "link", "del", self.peer], capture_output=True)


def kill_matching(pattern: str) -> bool:
    """SIGKILL the processes whose command line matches (as pgrep -f), each only if it still
    does once pinned: pid numbers wrap within a minute here (netkernel/pids.py)."""
    sent = False
    for pid in run(["pgrep", "-f", pattern]).stdout.split():
        sent |= pids.signal_if(int(pid), signal.SIGKILL, lambda p: _cmdline_matches(p, pattern))
    return sent


def _cmdline_matches(pid: int, pattern: str) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return False
    return re.search(pattern, cmdline) is not None


def frange(start: float, stop: float, step: float) -> list[float]:
    out, t = [], start
    while t < stop:
        out.append(t)
        t += step
    return out


def report(r: dict[str, Any]) -> str:
    t = r["totals"]
    lines = [
        f"soak: {'PASSED' if r['passed'] else 'FAILED'} after {r['seconds']:.0f} s",
        f"  operations {t['connections']:,}: ok {t['ok']:,}, cut by kills {t['cut']}, unexpected "
        f"failures {t['unexpected']}, corrupt {t['corrupt']}, hung {t['hung']}; "
        f"{t['bytes'] / 1e9:.2f} GB moved",
        "  faults: " + ", ".join(f"{k} {v}" for k, v in r["faults"].items()),
        f"  leaks: engine fds {r['leaks']['engine_fds']:+d}, daemon fds {r['leaks']['daemon_fds']:+d}, "
        f"namespaces {r['leaks']['namespaces'] or 'none'}, tenants {r['leaks']['tenants'] or 'none'}; "
        f"engine RSS {r['before']['engine_rss'] / 2**20:.1f} -> {r['after']['engine_rss'] / 2**20:.1f} MiB",
    ]
    for n, s in r["workloads"].items():
        lines.append(
            f"  {n:7s} ok {s['ok']:6d} cut {s['cut']:3d} unexpected {s['unexpected']} corrupt {s['corrupt']} "
            f"hung {s['hung']}" + (f"  e.g. {s['errors'][0]!r}" if s["errors"] else "")
        )
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--json", type=Path, help="write the result here too")
    args = ap.parse_args()
    if os.geteuid() != 0:
        ap.error("run as root (namespaces, the engine's /proc)")
    result = Soak(args.minutes).main()
    print(report(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
