"""`netkernel bench`: NetKernel side by side with native, pasta and slirp4netns, in one run.

Every configuration runs the same unmodified program and reaches the same peer over the
bridge ``nk0``:

```
 nkb-native (198.19.251.1) ── veth ───────────────────┐
 tenant nkbench ─ engine ─ NSM ─ veth ────────────────┤
 nkb-pasta ─ tap ─ pasta in nkb-pasta-h ─ veth ───────┼── nk0 ── veth ── nkb-peer (198.19.250.1)
 nkb-slirp ─ tap ─ slirp4netns in nkb-slirp-h ─ veth ─┤          servers / load generators
 nkb-slirp15 (MTU 1500) ─ … in nkb-slirp15-h ─ veth ──┘
```

For each workload the configurations take turns (the first one rotates with the repetition)
and the median of the repetitions is reported with min-max, the ratio to native and the
machine's CPU per unit of work. Two workloads are about NetKernel's own job rather than
speed, measured against native only: ``noisy_neighbour_kept``, the share of a quiet
program's request/response rate that it keeps while a noisy neighbour floods the stack, and
``muxN_gbps``, N sandboxes at once (N tenants on one engine thread, or N namespaces). The
floors are informational: the bench exits 0 when it measured everything, whatever the
numbers, and non-zero when a program is missing or a run failed.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO, Any, TextIO, TypeVar

from . import __version__, api, cgroups, netns
from .config import BRIDGE, LOG_FILE, PID_FILE, libdir, lwip_binary
from .errors import NetKernelError, NotRootError

T = TypeVar("T")

# -- what is measured -----------------------------------------------------------------------

TENANT = "nkbench"
NOISY_TENANT = "nkbench-noisy"
PEER_NS = "nkb-peer"
NATIVE_NS = "nkb-native"
NOISY_NS = "nkb-noisy"
PEER_V4, PEER_V6 = "198.19.250.1", "fd6e:6b00::ff:fa"
NATIVE_V4, NATIVE_V6 = "198.19.251.1", "fd6e:6b00::ff:fb"
NOISY_V4, NOISY_V6 = "198.19.252.1", "fd6e:6b00::ff:fc"
# The user-mode peers: each runs in a "host" namespace of ours (attached to nk0 like the
# native one, no route anywhere else) and serves a sandbox namespace through a tap device.
PASTA_GW = "198.19.253.254"  # pasta's gateway for the sandbox: an address nobody has
SLIRP_GUEST_V4 = "10.0.2.100"  # slirp4netns's fixed guest address
USERMODE_PORTS = (80, 6379)  # forwarded into the sandbox: nginx and redis-server
PREFIX_V4, PREFIX_V6 = 15, 64
FABRIC_V4 = ipaddress.ip_network("198.18.0.0/15")  # the default config's subnet

IPERF3_PORT = 5201
MUX_PORT = 5301  # the multiplexing workload's iperf3 servers: MUX_PORT + i
MUX_TENANT = "nkbench-mux"  # nkbench-mux0, nkbench-mux1, ...
MUX_NS = "nkb-mux"  # nkb-mux0, ...: the native counterparts
LWIP_TENANT = "nkbench-lw"  # the netkernel-lwip configuration's tenant, on NSM LWIP_NSM
LWIP_NSM = "nkbenchlw"
COLO_TENANT = "nkbench-colo"  # the server side of the colocated workloads
COLO_PORT = 7400  # their iperf3, sockperf (+1) and nginx (+2) servers
SOCKPERF_PORT = 11111
CRR_PORT = 7200
CRR_THREADS = 8
HTTP_PORT = 80
REDIS_PORT = 6379
IDLE_PORT = 7000
SINK_PORT = 7001

DEFAULT_DURATION = 10
QUICK_DURATION = 3
DEFAULT_REPETITIONS = 3
IDLE_SECONDS = 5.0
IDLE_SETTLE = 1.0
WRK_CONNECTIONS = 32
REDIS_REQUESTS = 100_000
REDIS_CLIENTS = 32

# Debian 12 package of each program the bench runs.
PACKAGES = {
    "iperf3": "iperf3",
    "sockperf": "sockperf",
    "nginx": "nginx",
    "wrk": "wrk",
    "redis-server": "redis-server",
    "redis-benchmark": "redis-tools",
    "pasta": "passt",
    "slirp4netns": "slirp4netns",
    "ip": "iproute2",
    "ss": "iproute2",
}


SIDES = ("native", "netkernel")


@dataclass(frozen=True)
class Configuration:
    """One way of giving a sandbox its network, measured with the same programs."""

    name: str
    what: str
    programs: tuple[str, ...] = ()
    mtu: int | None = None
    # User-mode peers: the sandbox's namespace (only their tap device), and the namespace
    # where they run and make their sockets, with its address on the bridge.
    netns: str | None = None
    host_ns: str | None = None
    host_v4: str = ""
    host_v6: str = ""


CONFIGS: tuple[Configuration, ...] = (
    Configuration("native", "the kernel stack in the sandbox's own namespace, a veth to the bridge"),
    Configuration("netkernel", "a NetKernel tenant: GuestLib, shared-memory rings, the engine, "
                  "the kernel NSM"),
    Configuration("pasta", "pasta (passt) serving the sandbox's tap, MTU 65520, its sockets "
                  "in nkb-pasta-h", ("pasta",), 65520, "nkb-pasta", "nkb-pasta-h", "198.19.251.2",
                  "fd6e:6b00::ff:f2"),
    Configuration("slirp4netns", "slirp4netns, MTU 65520, its sockets in nkb-slirp-h",
                  ("slirp4netns",), 65520, "nkb-slirp", "nkb-slirp-h", "198.19.251.3",
                  "fd6e:6b00::ff:f3"),
    Configuration("slirp4netns-1500", "slirp4netns, MTU 1500, its sockets in nkb-slirp15-h",
                  ("slirp4netns",), 1500, "nkb-slirp15", "nkb-slirp15-h", "198.19.251.4",
                  "fd6e:6b00::ff:f4"),
    Configuration("netkernel-lwip", "a NetKernel tenant on the lwIP NSM (netkernel-lwip: lwIP "
                  "in a process of its own, on a TAP device), the same programs unmodified"),
)
CONFIG_NAMES = tuple(c.name for c in CONFIGS)
# What NetKernel is compared with beyond native: the single-stream and latency floors.
PEERS = ("pasta", "slirp4netns", "slirp4netns-1500")
LWIP = "netkernel-lwip"
# Measured beside native and netkernel when chosen (all by default).
OTHERS = (*PEERS, LWIP)


@dataclass(frozen=True)
class Floor:
    """The issue's acceptance floor: ``of`` ("ratio" or "value") ``op`` ``bound``."""

    op: str  # ">=", "<=" or "<"
    bound: float
    of: str = "ratio"  # or "value" (a figure of NetKernel alone, in per cent) or "netkernel"

    def met(self, x: float | None) -> bool | None:
        if x is None:
            return None
        if self.op == ">=":
            return x >= self.bound
        if self.op == "<=":
            return x <= self.bound
        return x < self.bound

    def __str__(self) -> str:
        if self.of == "ratio":
            return f"ratio {self.op} {self.bound:g}"
        if self.of == "netkernel":
            return f"netkernel {self.op} {self.bound:g}"
        return f"{self.op} {self.bound:g} %"

    def as_json(self) -> dict[str, Any]:
        return {"of": self.of, "op": self.op, "bound": self.bound}


IDLE_FLOOR = Floor("<", 2.0, of="value")


@dataclass(frozen=True)
class Metric:
    name: str
    unit: str
    programs: tuple[str, ...]
    floor: Floor | None
    what: str
    # Where it is measured: all configurations, or only native and NetKernel (isolation).
    configs: tuple[str, ...] | None = None


METRICS: tuple[Metric, ...] = (
    Metric("iperf3_tcp_gbps", "Gbit/s", ("iperf3",), Floor(">=", 0.7),
           "iperf3 TCP throughput, one stream, client on the measured side"),
    Metric("iperf3_tcp_p4_gbps", "Gbit/s", ("iperf3",), None,
           "iperf3 TCP throughput, 4 streams, client on the measured side sends"),
    Metric("iperf3_tcp_rx_gbps", "Gbit/s", ("iperf3",), None,
           "iperf3 TCP throughput, one stream, the measured side receives (-R)"),
    Metric("iperf3_tcp_rx_p4_gbps", "Gbit/s", ("iperf3",), None,
           "iperf3 TCP throughput, 4 streams, the measured side receives (-R)"),
    Metric("tcp_rr_p50_us", "us", ("sockperf",), Floor("<=", 1.6),
           "sockperf TCP ping-pong p50 latency, 64-byte messages"),
    Metric("tcp_crr_rps", "req/s", (), None,
           "connection rate: connect, 64-byte request and answer, close; 8 threads "
           "(netkernel-crr client on the measured side, server in the peer)"),
    Metric("nginx_keepalive_rps", "req/s", ("nginx", "wrk"), Floor(">=", 0.7),
           "nginx 1 KiB file, wrk keep-alive, 32 connections"),
    Metric("nginx_close_rps", "req/s", ("nginx", "wrk"), Floor(">=", 0.5),
           "nginx 1 KiB file, wrk with Connection: close, 32 connections"),
    Metric("nginx_1m_keepalive_rps", "req/s", ("nginx", "wrk"), None,
           "nginx 1 MiB file, wrk keep-alive, 32 connections"),
    Metric("nginx_1m_close_rps", "req/s", ("nginx", "wrk"), None,
           "nginx 1 MiB file, wrk with Connection: close, 32 connections"),
    Metric("redis_get_rps", "req/s", ("redis-server", "redis-benchmark"), Floor(">=", 0.7),
           "redis-server GET, redis-benchmark 32 clients"),
    Metric("redis_set_rps", "req/s", ("redis-server", "redis-benchmark"), None,
           "redis-server SET, redis-benchmark 32 clients"),
    *(Metric(f"mux{n}_gbps", "Gbit/s", ("iperf3",), None,
             f"aggregate iperf3 throughput of {n} sandbox(es) at once, one stream each: "
             f"{n} tenant(s) on one engine thread vs {n} native namespace(s)", configs=SIDES)
      for n in (1, 4, 16)),
    Metric("noisy_neighbour_kept", "kept", ("sockperf",), Floor(">=", 0.8, of="netkernel"),
           "share of a quiet sockperf ping-pong's rate kept beside a noisy neighbour "
           "(200 connections, 16-byte writes)", configs=SIDES),
    # Colocated: client and server on one host. native = both in one namespace over loopback
    # TCP; netkernel = client in one tenant, server in another, over the shared-memory path.
    Metric("colo_iperf3_gbps", "Gbit/s", ("iperf3",), Floor(">=", 1.5),
           "colocated iperf3, one stream: tenant to tenant over shared memory vs loopback TCP "
           "in one namespace", configs=SIDES),
    Metric("colo_tcp_rr_p50_us", "us", ("sockperf",), Floor("<=", 0.8),
           "colocated sockperf ping-pong p50, 64-byte messages: tenant to tenant vs loopback",
           configs=SIDES),
    Metric("colo_nginx_keepalive_rps", "req/s", ("nginx", "wrk"), Floor(">=", 1.0),
           "colocated nginx 1 KiB, wrk keep-alive, 32 connections: tenant to tenant vs loopback",
           configs=SIDES),
    Metric("colo_tcp_crr_rps", "req/s", (), None,
           "colocated connection rate (connect, 64-byte request and answer, close; 8 threads): "
           "tenant to tenant vs loopback", configs=SIDES),
    Metric("colo_redis_get_rps", "req/s", ("redis-server", "redis-benchmark"), None,
           "colocated redis-server GET, redis-benchmark 32 clients: tenant to tenant vs loopback",
           configs=SIDES),
    Metric("idle_cpu_percent", "%", (), IDLE_FLOOR,
           "engine + daemon CPU over 5 s with the tenant idle, percent of one core",
           configs=("netkernel",)),
)
METRIC_NAMES = tuple(m.name for m in METRICS)
IDLE = "idle_cpu_percent"


class BenchError(NetKernelError):
    """A program is missing, the setup failed or a measurement could not be taken."""


class ParseError(BenchError):
    """A program's output did not contain the figure we need."""


class Interrupted(BaseException):
    """SIGTERM/SIGHUP while benchmarking: unwind through the cleanup like Ctrl-C."""


# -- parsers -----------------------------------------------------------------------------------

def _tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def parse_iperf3(text: str) -> dict[str, float]:
    """``iperf3 -J`` client report → {"gbps": receiver Gbit/s, "retransmits": n}.

    iperf3 3.12 exits 0 even when the test failed; the error is in the report's "error".
    """
    try:
        rep = json.loads(text)
    except json.JSONDecodeError:
        raise ParseError(f"iperf3: the output is not a JSON report:\n{_tail(text)}") from None
    if not isinstance(rep, dict):
        raise ParseError("iperf3: the JSON report is not an object")
    if rep.get("error"):
        raise ParseError(f"iperf3: {rep['error']}")
    try:
        received = rep["end"]["sum_received"]
        bps = float(received["bits_per_second"])
        nbytes = int(received["bytes"])
    except (KeyError, TypeError, ValueError):
        raise ParseError("iperf3: the report has no end.sum_received") from None
    if nbytes <= 0:
        raise ParseError("iperf3: the receiver got no bytes")
    retransmits = rep["end"].get("sum_sent", {}).get("retransmits", 0)
    return {"gbps": bps / 1e9, "retransmits": float(retransmits or 0)}


_SOCKPERF_PCT = re.compile(r"percentile\s+(\d+\.\d+)\s*=\s*([0-9.]+)")
_SOCKPERF_ERR = re.compile(r"(?:ERROR|error)[:!]?\s*(.*)")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def parse_sockperf(text: str) -> dict[str, float]:
    """``sockperf ping-pong`` output → {"p50_us", "p99_us", "avg_us"} (sockperf reports usec).

    sockperf 3.7 exits 0 even when it could not connect: no percentiles means failure.
    """
    text = _ANSI.sub("", text)
    pcts = {m[1]: float(m[2]) for m in _SOCKPERF_PCT.finditer(text)}
    if "50.000" not in pcts:
        err = _SOCKPERF_ERR.search(text)
        why = err[1].strip() if err else "no 'percentile 50.000' line"
        raise ParseError(f"sockperf: {why}\n{_tail(text)}")
    out = {"p50_us": pcts["50.000"]}
    if "99.000" in pcts:
        out["p99_us"] = pcts["99.000"]
    avg = re.search(r"avg-latency=([0-9.]+)", text)
    if avg:
        out["avg_us"] = float(avg[1])
    return out


@dataclass
class WrkResult:
    requests_per_sec: float
    requests: int
    socket_errors: dict[str, int] = field(
        default_factory=lambda: {"connect": 0, "read": 0, "write": 0, "timeout": 0})
    non_2xx_3xx: int = 0

    @property
    def total_socket_errors(self) -> int:
        return sum(self.socket_errors.values())


def parse_wrk(text: str) -> WrkResult:
    """wrk's summary → requests/s, request count, "Socket errors" and non-2xx/3xx counts."""
    rps = re.search(r"^Requests/sec:\s*([0-9.]+)", text, re.M)
    if not rps:
        raise ParseError(f"wrk: no 'Requests/sec' in its output:\n{_tail(text)}")
    n = re.search(r"^\s*(\d+) requests in ", text, re.M)
    res = WrkResult(float(rps[1]), int(n[1]) if n else 0)
    se = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    if se:
        res.socket_errors = dict(zip(("connect", "read", "write", "timeout"),
                                     map(int, se.groups()), strict=True))
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    if bad:
        res.non_2xx_3xx = int(bad[1])
    return res


def parse_redis_benchmark(text: str, test: str = "GET") -> float:
    """requests/s of ``test`` from ``redis-benchmark --csv`` or ``-q`` output."""
    csv = re.search(rf'^"{re.escape(test)}","([0-9.]+)"', text, re.M)
    if csv:
        return float(csv[1])
    # -q: progress lines "GET: rps=..." end in \r; the result is "GET: N requests per second".
    quiet = re.findall(rf"{re.escape(test)}: ([0-9.]+) requests per second", text)
    if quiet:
        return float(quiet[-1])
    raise ParseError(f"redis-benchmark: no {test} result in its output:\n{_tail(text)}")


# -- small helpers -------------------------------------------------------------------------------

def median(xs: Sequence[float]) -> float | None:
    return float(statistics.median(xs)) if xs else None


def ratio(native: float | None, netkernel: float | None) -> float | None:
    if native is None or netkernel is None or native == 0:
        return None
    return netkernel / native


def select_metrics(only: str | None) -> list[Metric]:
    if not only:
        return list(METRICS)
    wanted = [w.strip() for w in only.split(",") if w.strip()]
    unknown = [w for w in wanted if w not in METRIC_NAMES]
    if unknown or not wanted:
        raise BenchError(f"--only: unknown metric {', '.join(unknown) or '(none)'} "
                         f"(known: {', '.join(METRIC_NAMES)})")
    return [m for m in METRICS if m.name in wanted]


def select_configs(only: str | None) -> list[Configuration]:
    """native and netkernel always; of the user-mode peers all, or those named."""
    if not only:
        return list(CONFIGS)
    wanted = [w.strip() for w in only.split(",") if w.strip()]
    if wanted == ["none"]:
        wanted = []
    unknown = [w for w in wanted if w not in OTHERS and w not in SIDES]
    if unknown or (not wanted and only.strip() != "none"):
        raise BenchError(f"--configs: unknown configuration {', '.join(unknown) or '(none)'} "
                         f"(known: {', '.join(OTHERS)}; native and netkernel are always measured; "
                         "'none' for no others)")
    return [c for c in CONFIGS if c.name in SIDES or c.name in wanted]


def missing_programs(metrics: Sequence[Metric], configs: Sequence[Configuration] = ()) -> list[str]:
    needed = ["ip", "ss"]
    for m in metrics:
        needed += [p for p in m.programs if p not in needed]
    for c in configs:
        needed += [p for p in c.programs if p not in needed]
    return [p for p in needed if shutil.which(p) is None]


def missing_message(missing: Sequence[str]) -> str:
    pkgs = sorted({PACKAGES.get(p, p) for p in missing})
    return (f"bench needs {', '.join(missing)}, not found in PATH; "
            f"install with: apt-get install {' '.join(pkgs)}")


def machine_idle_seconds() -> tuple[float, int]:
    """All CPUs' idle time (idle, iowait, steal) in seconds, and the number of CPUs counted.

    Busy time is what is left of the wall clock. Measured this way round because the kernel
    accounts user and system time by sampling the timer tick (250 Hz here): a program that
    wakes every millisecond, as a paced iperf3 does, can fall between ticks and look idle.
    With NO_HZ (Debian's kernels) idle time is measured at each entry to and exit from the
    idle loop, so it is exact up to /proc/stat's 10 ms unit."""
    hz = os.sysconf("SC_CLK_TCK")
    idle, cpus = 0, 0
    with open("/proc/stat") as f:
        for line in f:
            name, *rest = line.split()
            if name == "cpu" or not name.startswith("cpu"):
                continue
            fields = [int(x) for x in rest[:8]]
            idle += fields[3] + fields[4] + fields[7]
            cpus += 1
    return idle / hz, cpus


def proc_cpu_ticks(pid: int) -> int:
    """utime + stime of a process (all its threads), in clock ticks."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # fields 14 and 15 of proc(5)


def cpu_percent(pids: Sequence[int], seconds: float,
                sleep: Callable[[float], None] = time.sleep) -> dict[int, float]:
    """Percent of one core each pid used over ``seconds`` (0 for a pid that vanished)."""
    hz = os.sysconf("SC_CLK_TCK")

    def sample() -> dict[int, int | None]:
        out: dict[int, int | None] = {}
        for pid in pids:
            try:
                out[pid] = proc_cpu_ticks(pid)
            except (OSError, IndexError, ValueError):
                out[pid] = None
        return out

    t0, before = time.monotonic(), sample()
    sleep(seconds)
    t1, after = time.monotonic(), sample()
    elapsed = max(t1 - t0, 1e-6)
    result = {}
    for pid in pids:
        b, a = before[pid], after[pid]
        result[pid] = 0.0 if a is None or b is None else (a - b) / hz / elapsed * 100.0
    return result


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "netkernel": __version__,
        "libdir": str(libdir()),
    }
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                info["os"] = line.split("=", 1)[1].strip('"')
    except OSError:
        pass
    try:
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        info["memory_gib"] = round(kb / 1024 / 1024, 1)
    except (OSError, ValueError, IndexError):
        pass
    try:
        info["tcp_congestion_control"] = \
            Path("/proc/sys/net/ipv4/tcp_congestion_control").read_text().strip()
    except OSError:
        pass
    return info


def program_versions(programs: Sequence[str]) -> dict[str, str]:
    probes = {
        "iperf3": ["iperf3", "--version"],
        "sockperf": ["sockperf", "--version"],
        "nginx": ["nginx", "-v"],
        "wrk": ["wrk", "-v"],
        "redis-server": ["redis-server", "--version"],
        "slirp4netns": ["slirp4netns", "--version"],
        "pasta": ["dpkg-query", "-W", "-f", "passt ${Version}", "passt"],  # no --version
    }
    out = {}
    for p in programs:
        if p not in probes:
            continue
        try:
            r = subprocess.run(probes[p], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            continue
        lines = (r.stdout + r.stderr).strip().splitlines()
        if lines:
            out[p] = _ANSI.sub("", lines[0]).strip()
    return out


def lowest_priority(pid: int) -> None:
    """Make the session of ``pid`` (spawned in a session of its own) the lowest CPU priority.

    With sched_autogroup (on in Debian's kernels) each session is a scheduling group and
    CPU is shared between groups first: a `nice 19` process alone in its session still gets
    as much CPU as the engine's whole group. The group's own nice is in /proc/PID/autogroup.
    """
    try:
        netns.set_autogroup_nice(pid, 19)
    except OSError:
        pass  # plain nice is all we can do


def lowest_tenant_priority(tenant: str) -> None:
    """The tenant's CPU weight at its least: what nice 19 weighs (cgroup v1 shares 15, v2
    weight 1). A tenant's processes sit in its own cgroup (cgroups.py), whose weight against
    other tenants and the engine comes from its policy; a nice inside it (or the autogroup's,
    which does not apply inside a cgroup) lowers it only against its own processes."""
    try:
        places = cgroups.discover(int(PID_FILE.read_text()))
    except (OSError, ValueError):
        return
    place = places.get("cpu")
    if place is None:
        return
    d = place.tenant_dir(tenant)
    try:
        if place.v2:
            (d / "cpu.weight").write_text("1")
        else:
            (d / "cpu.shares").write_text("15")
    except OSError:
        pass  # no cpu controller for it: nice is all there is


# -- where programs run --------------------------------------------------------------------------

@dataclass(frozen=True)
class Place:
    """Where a program runs: a namespace we made (via `ip netns exec`) or the tenant
    (via `netkernel run`)."""

    name: str  # "peer", or a configuration's name
    addr: str  # where the peer reaches its servers
    netns: str | None = None
    tenant: str | None = None
    listen: str | None = None  # the address its servers bind, when not addr (slirp4netns)

    def argv(self, cmd: Sequence[str], scratch: Path | None = None) -> list[str]:
        if self.tenant is not None:
            # The host's files are read-only in a tenant: the bench's scratch directory is
            # granted (nginx writes its pid, logs and temp files there).
            grant = ["--rw", str(scratch)] if scratch is not None else []
            return [sys.executable, "-m", "netkernel", "run", "--tenant", self.tenant, *grant, "--", *cmd]
        assert self.netns is not None
        return ["ip", "netns", "exec", self.netns, *cmd]


# Python for programs the bench runs, in tenants too: the system's, which a tenant's
# unprivileged users can reach (one under /root, as pyenv installs it, they cannot).
PYTHON = "/usr/bin/python3" if os.access("/usr/bin/python3", os.X_OK) else sys.executable


def url_host(addr: str) -> str:
    return f"[{addr}]" if ":" in addr else addr


NGINX_CONF = """\
daemon off;
master_process on;
worker_processes 2;
user root;
pid {d}/nginx-{side}.pid;
error_log {d}/nginx-{side}.error.log warn;

events {{
    use epoll;
    worker_connections 1024;
}}

http {{
    access_log off;
    sendfile on;
    keepalive_requests 1000000;
    client_body_temp_path {d}/tmp-{side}/body;
    proxy_temp_path {d}/tmp-{side}/proxy;
    fastcgi_temp_path {d}/tmp-{side}/fastcgi;
    uwsgi_temp_path {d}/tmp-{side}/uwsgi;
    scgi_temp_path {d}/tmp-{side}/scgi;
    default_type application/octet-stream;

    server {{
        listen {listen};
        root {d}/www;
    }}
}}
"""

# The idle tenant: a listener holding one accepted connection, blocked in accept().
IDLE_PROG = """\
import socket, sys
fam = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
s = socket.socket(fam, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
s.listen(16)
held = []
while True:
    c, _ = s.accept()
    held.append(c)
"""


# Alone/beside pairs per noisy-neighbour sample (see m_noisy).
NOISY_PAIRS = 3

# The noisy neighbour: 200 connections, 16-byte writes as fast as it can (TCP_NODELAY, so
# every write is a send of its own for the stack); and the sink it floods, in the peer.
FLOOD_PROG = """\
import socket, sys, time
socks = [socket.create_connection((sys.argv[1], int(sys.argv[2]))) for _ in range(200)]
for s in socks:
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    s.setblocking(False)
end = time.monotonic() + float(sys.argv[3])
while time.monotonic() < end:
    for s in socks:
        try:
            s.send(b"x" * 16)
        except BlockingIOError:
            pass
"""

SINK_PROG = """\
import selectors, socket, sys
sel = selectors.DefaultSelector()
ls = socket.create_server((sys.argv[1], int(sys.argv[2])), backlog=512)
sel.register(ls, selectors.EVENT_READ)
while True:
    for key, _ in sel.select():
        if key.fileobj is ls:
            c, _ = ls.accept()
            sel.register(c, selectors.EVENT_READ)
        else:
            try:
                data = key.fileobj.recv(1 << 16)
            except OSError:
                data = b""
            if not data:
                sel.unregister(key.fileobj)
                key.fileobj.close()
"""


# -- the bench ------------------------------------------------------------------------------------

@dataclass
class Options:
    duration: int = DEFAULT_DURATION
    repetitions: int = DEFAULT_REPETITIONS
    metrics: list[Metric] = field(default_factory=lambda: list(METRICS))
    quick: bool = False
    configs: list[Configuration] = field(default_factory=lambda: list(CONFIGS))
    out: Path | None = None  # folder for the Markdown table, the JSON and the charts


def configs_of(m: Metric, configs: Sequence[Configuration]) -> list[Configuration]:
    """The chosen configurations that metric m is measured in, in bench order."""
    return [c for c in configs if m.configs is None or c.name in m.configs]


@dataclass
class MetricResult:
    metric: Metric
    samples: dict[str, list[float]] = field(default_factory=lambda: {c: [] for c in CONFIG_NAMES})
    extra: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    peer_errors: dict[str, list[str]] = field(default_factory=dict)  # failed runs of pasta etc.

    @property
    def native(self) -> float | None:
        return median(self.samples["native"])

    @property
    def netkernel(self) -> float | None:
        return median(self.samples["netkernel"])

    @property
    def ratio(self) -> float | None:
        return ratio(self.native, self.netkernel)

    @property
    def meets_floor(self) -> bool | None:
        floor = self.metric.floor
        if floor is None:
            return None
        return floor.met(self.netkernel if floor.of == "netkernel" else self.ratio)

    def value(self, config: str) -> float | None:
        return median(self.samples.get(config, []))

    def cpu_per_unit(self, config: str) -> float | None:
        """Cores busy machine-wide per Gbit/s, or core-seconds per 1000 requests."""
        cores, v = self.extra.get(f"{config}_cpu_cores"), self.value(config)
        if cores is None or not v or self.metric.unit not in ("Gbit/s", "req/s"):
            return None
        return float(cores) / (v if self.metric.unit == "Gbit/s" else v / 1000.0)

    def configurations(self) -> dict[str, dict[str, Any]]:
        """Per configuration measured: median, min, max, samples, ratio to native."""
        out: dict[str, dict[str, Any]] = {}
        for c, xs in self.samples.items():
            if not xs:
                continue
            out[c] = {"value": median(xs), "min": min(xs), "max": max(xs), "samples": xs,
                      "ratio_to_native": ratio(self.native, median(xs)),
                      "cpu_cores": self.extra.get(f"{c}_cpu_cores"),
                      "cpu_per_unit": self.cpu_per_unit(c)}
        return out

    def as_json(self) -> dict[str, Any]:
        r = self.ratio
        d: dict[str, Any] = {
            "metric": self.metric.name,
            "unit": self.metric.unit,
            "native": self.native,
            "netkernel": self.netkernel,
            "ratio": r,
            "floor": self.metric.floor.as_json() if self.metric.floor else None,
            "meets_floor": self.meets_floor,
            "native_samples": self.samples["native"],
            "netkernel_samples": self.samples["netkernel"],
            "configurations": self.configurations(),
        }
        d.update(self.extra)
        for c, errs in self.peer_errors.items():
            d[f"{c}_failed_runs"] = errs
        if self.error:
            d["error"] = self.error
        return d


@dataclass
class IdleResult:
    percent: float | None = None
    engine: float | None = None
    daemon: float | None = None
    tenant: float | None = None
    seconds: float = IDLE_SECONDS
    error: str | None = None

    def as_json(self) -> dict[str, Any]:
        floor = IDLE_FLOOR
        return {
            "percent": self.percent, "engine_percent": self.engine,
            "daemon_percent": self.daemon, "tenant_processes_percent": self.tenant,
            "seconds": self.seconds, "floor": floor.as_json(),
            "meets_floor": floor.met(self.percent),
            **({"error": self.error} if self.error else {}),
        }


@dataclass
class Report:
    results: list[MetricResult]
    idle: IdleResult | None
    machine: dict[str, Any]
    settings: dict[str, Any]

    @property
    def peer_failures(self) -> list[str]:
        return [f"{r.metric.name} {c}: {len(errs)} run(s) failed: {errs[0].splitlines()[0]}"
                for r in self.results for c, errs in r.peer_errors.items()]

    @property
    def errors(self) -> list[str]:
        errs = [f"{r.metric.name}: {r.error}" for r in self.results if r.error]
        if self.idle is not None and self.idle.error:
            errs.append(f"{IDLE}: {self.idle.error}")
        return errs

    def as_json(self) -> dict[str, Any]:
        entries = []
        for r in self.results:
            for c, d in r.configurations().items():
                entries.append({"metric": r.metric.name, "configuration": c, "unit": r.metric.unit,
                                **d})
        return {
            "results": [r.as_json() for r in self.results],
            "entries": entries,
            "peer_floors": peer_floors(self.results),
            "idle_cpu_percent": self.idle.percent if self.idle else None,
            "idle_cpu": self.idle.as_json() if self.idle else None,
            "machine": self.machine,
            "settings": self.settings,
            "errors": self.errors,
            "peer_failures": self.peer_failures,
        }


def peer_floors(results: Sequence[MetricResult]) -> list[dict[str, Any]]:
    """NetKernel against the user-mode peers: single-stream throughput at least 1.5 times
    theirs, request/response latency no higher; and 16 tenants multiplexed on one engine
    thread take no more CPU per Gbit/s than 16 native namespaces."""
    out = []
    for r in results:
        if r.metric.name not in ("iperf3_tcp_gbps", "tcp_rr_p50_us"):
            continue
        want = (">=", 1.5) if r.metric.name == "iperf3_tcp_gbps" else ("<=", 1.0)
        for peer in PEERS:
            x = ratio(r.value(peer), r.netkernel)
            if x is None:
                continue
            out.append({"metric": r.metric.name, "peer": peer, "netkernel_over_peer": x,
                        "floor": f"netkernel / {peer} {want[0]} {want[1]:g}",
                        "met": Floor(want[0], want[1]).met(x)})
    for r in results:
        if r.metric.name != "mux16_gbps":
            continue
        # 16 tenants on one engine against 16 namespaces: CPU for the same throughput.
        x = ratio(r.cpu_per_unit("native"), r.cpu_per_unit("netkernel"))
        if x is not None:
            out.append({"metric": r.metric.name, "peer": "native", "netkernel_over_peer": x,
                        "floor": "CPU per Gbit/s, 16 tenants / 16 native namespaces <= 1",
                        "met": Floor("<=", 1.0).met(x)})
    return out


def _fmt(x: float | None, unit: str) -> str:
    if x is None:
        return "-"
    if unit == "req/s":
        return f"{x:,.0f}"
    if unit == "Gbit/s":
        return f"{x:.2f}"
    if unit == "us":
        return f"{x:.1f}"
    return f"{x:.2f}"


def render_table(report: Report) -> str:
    headers = ["metric", "unit", "native", "netkernel", "ratio", "floor", "meets floor"]
    right = {2, 3, 4}
    rows: list[list[str]] = []

    def verdict(ok: bool | None, error: str | None) -> str:
        if error:
            return "FAILED (error below)"
        return "-" if ok is None else ("yes" if ok else "NO")

    # The user-mode peers measured, in columns after NetKernel's floor.
    others = [c for c in OTHERS if any(r.samples.get(c) or c in r.peer_errors for r in report.results)]
    headers += others
    right |= {7 + i for i in range(len(others))}
    for r in report.results:
        m = r.metric
        rt = r.ratio
        rows.append([m.name, m.unit, _fmt(r.native, m.unit), _fmt(r.netkernel, m.unit),
                     "-" if rt is None else f"{rt:.2f}", str(m.floor or "-"),
                     verdict(r.meets_floor, r.error)]
                    + ["FAILED" if not r.samples.get(c) and c in r.peer_errors
                       else _fmt(r.value(c), m.unit) for c in others])
    if report.idle is not None:
        floor = IDLE_FLOOR
        rows.append([IDLE, "%", "-", _fmt(report.idle.percent, "%"), "-", str(floor),
                     verdict(floor.met(report.idle.percent), report.idle.error)]
                    + ["-" for _ in others])
    cells = [headers] + rows
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = []
    for row in cells:
        parts = [c.rjust(w) if i in right else c.ljust(w)
                 for i, (c, w) in enumerate(zip(row, widths, strict=True))]
        lines.append("  ".join(parts).rstrip())
    lines.insert(1, "  ".join("-" * w for w in widths))
    s = report.settings
    notes = [f"median of {s['repetitions']} run(s) per configuration, {s['duration']} s each, "
             "configurations interleaved; ratio = netkernel / native"]
    notes += [f"failed run (not counted): {e}" for e in report.peer_failures]
    for f in peer_floors(report.results):
        notes.append(f"{f['floor']}: {f['netkernel_over_peer']:.2f} "
                     f"({'met' if f['met'] else 'NOT met'})")
    for r in report.results:
        for side in CONFIG_NAMES:
            errs = r.extra.get(f"{side}_socket_errors")
            # native and NetKernel always (0 is the figure to check); the others when not 0.
            if errs is not None and (side in SIDES or sum(errs.values())):
                total = sum(errs.values())
                bad = r.extra.get(f"{side}_non_2xx_3xx", 0)
                detail = ", ".join(f"{k} {v}" for k, v in errs.items())
                notes.append(f"{r.metric.name} {side}: socket errors {total}"
                             + (f" ({detail})" if total else "")
                             + (f", non-2xx/3xx responses {bad}" if bad else ""))
    engine = [f"{r.metric.name} {r.extra['netkernel_engine_cpu_percent']:.0f} %" for r in report.results
              if r.extra.get("netkernel_engine_cpu_percent") is not None]
    if engine:
        notes.append("engine CPU during the NetKernel runs (of one core): " + ", ".join(engine))
    if report.idle is not None and report.idle.percent is not None:
        i = report.idle
        notes.append(f"idle: engine {i.engine:.2f} % + daemon {i.daemon:.2f} % of one core over "
                     f"{i.seconds:.0f} s (tenant processes: {i.tenant:.2f} %)")
    return "\n".join(lines + [""] + notes)


def render_markdown(report: Report) -> str:
    """The full table: per metric and configuration the median with min-max, the ratio to
    native, and the CPU it took (machine-wide, load generator included)."""
    configs = [c for c in CONFIG_NAMES
               if any(r.samples.get(c) or c in r.peer_errors for r in report.results)]
    s = report.settings
    out = ["# netkernel bench", "",
           f"Median of {s.get('repetitions')} run(s) of {s.get('duration')} s per configuration "
           "(min–max in brackets), configurations interleaved; ×N is the ratio to native.", ""]
    out.append("| metric | unit | " + " | ".join(configs) + " | floor (NetKernel) |")
    out.append("|---|---|" + "---:|" * len(configs) + "---|")
    for r in report.results:
        m = r.metric
        cells = []
        for c in configs:
            xs = r.samples.get(c) or []
            if not xs:
                cells.append("FAILED" if r.error or c in r.peer_errors else "–")
                continue
            cell = _fmt(median(xs), m.unit)
            if len(xs) > 1:
                cell += f" ({_fmt(min(xs), m.unit)}–{_fmt(max(xs), m.unit)})"
            rt = ratio(r.native, median(xs))
            if c != "native" and rt is not None:
                cell += f" ×{rt:.2f}"
            cells.append(cell)
        verdict = "" if r.meets_floor is None else (" met" if r.meets_floor else " NOT met")
        out.append(f"| {m.name} | {m.unit} | " + " | ".join(cells)
                   + f" | {m.floor or '–'}{verdict} |")
    if report.idle is not None and report.idle.percent is not None:
        out += ["", f"Idle: engine + daemon {report.idle.percent:.2f} % of one core "
                f"(floor {IDLE_FLOOR})."]
    cpu_rows = [r for r in report.results if any(r.cpu_per_unit(c) is not None for c in configs)]
    if cpu_rows:
        out += ["", "## CPU", "",
                "Busy cores of the whole machine during each run (/proc/stat: the configuration, "
                "its helpers and the load generator in the peer, which is the same for all) per "
                "Gbit/s, or core-seconds per 1000 requests. Lower is better.", "",
                "| metric | per | " + " | ".join(configs) + " |",
                "|---|---|" + "---:|" * len(configs)]
        for r in cpu_rows:
            per = "Gbit/s" if r.metric.unit == "Gbit/s" else "1k req"
            vals = [r.cpu_per_unit(c) for c in configs]
            out.append(f"| {r.metric.name} | {per} | "
                       + " | ".join("–" if v is None else f"{v:.3f}" for v in vals) + " |")
    floors = peer_floors(report.results)
    if floors:
        out += ["", "## NetKernel against the user-mode stacks", ""]
        out += [f"- {f['floor']}: {f['netkernel_over_peer']:.2f} — "
                f"{'met' if f['met'] else 'NOT met'}" for f in floors]
    if report.peer_failures:
        out += ["", "## Failed runs of the user-mode stacks", ""]
        out += [f"- {e}" for e in report.peer_failures]
    if report.errors:
        out += ["", "## Errors", ""] + [f"- {e.splitlines()[0]}" for e in report.errors]
    return "\n".join(out) + "\n"


def check_out_dir(out: Path) -> None:
    """Before measuring: the folder can be written, and matplotlib is there for the charts."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise BenchError("--out writes PNG charts with matplotlib, which is not installed; "
                         "install it with: pip install matplotlib (or pip install "
                         "'netkernel[bench]')") from None
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BenchError(f"--out {out}: {e.strerror}") from None
    if not os.access(out, os.W_OK):
        raise BenchError(f"--out {out}: not writable")


def write_outputs(report: Report, out: Path) -> list[Path]:
    """results.md, results.json and one chart per metric (median bars, min-max whiskers)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    written = [out / "results.md", out / "results.json"]
    written[0].write_text(render_markdown(report))
    written[1].write_text(json.dumps(report.as_json(), indent=2) + "\n")
    charts = out / "charts"
    charts.mkdir(exist_ok=True)
    for r in report.results:
        names = [c for c in CONFIG_NAMES if r.samples.get(c)]
        if not names:
            continue
        meds = [median(r.samples[c]) or 0.0 for c in names]
        lo = [m - min(r.samples[c]) for m, c in zip(meds, names, strict=True)]
        hi = [max(r.samples[c]) - m for m, c in zip(meds, names, strict=True)]
        fig, ax = plt.subplots(figsize=(7, 3.6))
        colors = ["#777777" if c == "native" else "#1f77b4" if c == "netkernel" else "#ff7f0e"
                  for c in names]
        ax.bar(names, meds, yerr=[lo, hi], capsize=4, color=colors)
        ax.set_ylabel(r.metric.unit)
        ax.set_title(f"{r.metric.name}: {r.metric.what}", fontsize=8)
        ax.tick_params(axis="x", labelsize=8)
        fig.tight_layout()
        path = charts / f"{r.metric.name}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


class Bench:
    def __init__(self, opts: Options, progress: TextIO | None = None) -> None:
        self.opts = opts
        self.out = progress if progress is not None else sys.stderr
        self.tmp = Path(tempfile.mkdtemp(prefix="netkernel-bench-"))
        # Tenants run as unprivileged host users, one uid range each, and several tenants
        # write here (nginx's pid, logs, temp files): open to all, sticky, as /tmp is.
        self.tmp.chmod(0o1777)
        self.procs: list[subprocess.Popen[bytes]] = []
        self.started_daemon = False
        self.made_tenant = False
        self.made_noisy_tenant = False
        self.made_lwip = False
        self.mux_tenants: list[str] = []
        self.colo_server: Place | None = None
        self.usermode: dict[str, subprocess.Popen[bytes]] = {}  # pasta / slirp4netns
        self.usermode_used: set[str] = set()  # run once: restarted before the next run
        # A count, not a duration: a quick pass must not wait on slirp4netns (~4k req/s).
        self.redis_requests = REDIS_REQUESTS // 5 if opts.quick else REDIS_REQUESTS
        self.made_ns: list[str] = []
        self.peer = Place("peer", PEER_V4, netns=PEER_NS)
        self.native = Place("native", NATIVE_V4, netns=NATIVE_NS)
        self.tenant: Place | None = None
        self.places: dict[str, Place] = {}  # configuration name -> where its programs run
        self.tenant_netns = ""
        self.status: dict[str, Any] = {}
        self.engine_pid: int | None = None
        self._engine_cpu: list[float] = []  # per NetKernel run of the current metric
        self._cpu: dict[str, list[float]] = {}  # machine-wide cores busy, per configuration
        self.step = 0
        self.total_steps = self._steps_through(None)

    # -- output ----------------------------------------------------------------------------
    def say(self, msg: str) -> None:
        print(f"bench: {msg}", file=self.out, flush=True)

    # -- processes ---------------------------------------------------------------------------
    def run(self, place: Place, cmd: Sequence[str], timeout: float, what: str,
            ok_codes: Sequence[int] = (0,)) -> str:
        """Run to completion; return stdout+stderr; BenchError on timeout or a bad status."""
        argv = place.argv(cmd, self.tmp)
        try:
            proc = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, timeout=timeout, cwd=self.tmp)
        except subprocess.TimeoutExpired as e:
            out = (e.output or b"").decode(errors="replace")
            raise BenchError(f"{what}: `{' '.join(cmd)}` ({place.name}) did not finish within "
                             f"{timeout:.0f}s\n{_tail(out)}" + self._log_hint(place)) from None
        out = proc.stdout.decode(errors="replace")
        if proc.returncode not in ok_codes:
            raise BenchError(f"{what}: `{' '.join(cmd)}` ({place.name}) exited with status "
                             f"{proc.returncode}\n{_tail(out)}" + self._log_hint(place))
        return out

    def _log_hint(self, place: Place) -> str:
        return f"\n(see {LOG_FILE} for the engine's side)" if place.tenant else ""

    def spawn(self, place: Place, cmd: Sequence[str], log_name: str) -> subprocess.Popen[bytes]:
        log = open(self.tmp / log_name, "wb")  # the child keeps its own copy
        try:
            # Own session: a Ctrl-C on the terminal reaches us, and we stop servers in order.
            p = subprocess.Popen(place.argv(cmd, self.tmp), stdin=subprocess.DEVNULL, stdout=log,
                                 stderr=subprocess.STDOUT, cwd=self.tmp, start_new_session=True)
        finally:
            log.close()
        self.procs.append(p)
        return p

    def stop(self, p: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 10) -> None:
        if p.poll() is None:
            try:
                p.send_signal(sig)
                p.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=timeout)
            except ProcessLookupError:
                pass
        if p in self.procs:
            self.procs.remove(p)

    def log_text(self, log_name: str) -> str:
        try:
            return (self.tmp / log_name).read_text(errors="replace")
        except OSError:
            return ""

    def _died(self, p: subprocess.Popen[bytes], place: Place, what: str, log_name: str) -> BenchError:
        return BenchError(f"{what} ({place.name}) exited with status {p.returncode} while starting:\n"
                          f"{_tail(self.log_text(log_name))}" + self._log_hint(place))

    def wait_listening(self, ns: str, port: int, p: subprocess.Popen[bytes], place: Place,
                       what: str, log_name: str, timeout: float = 20) -> None:
        """A server in one of our namespaces: wait for its listening socket (no probe
        connection, which iperf3 would count as a test)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if p.poll() is not None:
                raise self._died(p, place, what, log_name)
            r = subprocess.run(["ip", "netns", "exec", ns, "ss", "-Hltn", f"sport = :{port}"],
                               capture_output=True, text=True)
            if r.stdout.strip():
                return
            time.sleep(0.1)
        raise BenchError(f"{what} ({place.name}) not listening on port {port} after {timeout:.0f}s:\n"
                         f"{_tail(self.log_text(log_name))}")

    def wait_accepting(self, addr: str, port: int, p: subprocess.Popen[bytes], place: Place,
                       what: str, log_name: str, timeout: float = 20) -> None:
        """Poll from the peer namespace until addr:port accepts (the path the load takes)."""
        if place.name in PEERS and place.netns:
            # pasta and slirp4netns accept on the host side before they try the sandbox.
            self.wait_listening(place.netns, port, p, place, what, log_name, timeout)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if p.poll() is not None:
                raise self._died(p, place, what, log_name)
            if netns.tcp_accepts(PEER_NS, addr, port):
                return
            time.sleep(0.1)
        raise BenchError(f"{what} ({place.name}) not accepting on {addr}:{port} after "
                         f"{timeout:.0f}s:\n{_tail(self.log_text(log_name))}" + self._log_hint(place))

    # -- setup and teardown ----------------------------------------------------------------
    def setup(self) -> None:
        self.status = api.ping() or {}
        if not self.status:
            self.say("the daemon is not running: starting it (built-in config); "
                     "it is stopped at the end")
            self.started_daemon = True  # even if `up` is interrupted half-way: `down` cleans up
            r = subprocess.run([sys.executable, "-m", "netkernel", "up"], capture_output=True,
                               text=True, timeout=120)
            if r.returncode != 0:
                raise BenchError(f"`netkernel up` failed ({r.returncode}):\n{r.stdout}{r.stderr}")
            self.status = api.ping() or {}
            if not self.status:
                raise BenchError("the daemon started but does not answer")
        else:
            self.say(f"using the running daemon (pid {self.status.get('pid')})")
        nsms = self.status.get("nsms") or []
        if nsms:
            nsm_v4 = ipaddress.ip_address(str(nsms[0]["ipv4"]).split("/")[0])
            if nsm_v4 not in FABRIC_V4:
                raise BenchError(f"the daemon's subnet is not the default {FABRIC_V4} (NSM "
                                 f"{nsms[0]['name']} has {nsm_v4}); the bench needs the default "
                                 "[network] addresses for its peer namespaces")
        if self.status.get("engine_pid"):
            self.engine_pid = int(self.status["engine_pid"])
        self._remove_leftovers()
        for ns, v4, v6 in ((PEER_NS, PEER_V4, PEER_V6), (NATIVE_NS, NATIVE_V4, NATIVE_V6)):
            self._attach_ns(ns, v4, v6)
        # The load generator: wrk closes a `Connection: close` connection as soon as it has
        # the response, for a few per cent of them before the server's FIN arrives, so the
        # peer collects TIME_WAIT sockets (a few hundred a second). Once they fill its even ephemeral
        # ports (~14k of 28k) every connect() scans the port range and wrk becomes
        # CPU-bound in the kernel (measured: 12k -> 300 req/s for whichever side runs then).
        # Reusing TIME_WAIT ports for outgoing connections is the usual load-generator
        # setting; it touches only the peer, never the stacks being compared.
        netns.sysctl("net.ipv4.tcp_tw_reuse", "1", netns=PEER_NS)
        self.made_tenant = True  # set first: an interrupted create may still have happened
        reply = api.call("tenant-create", name=TENANT)
        t = reply["tenant"]
        self.tenant = Place("netkernel", str(t["ipv4"]), tenant=TENANT)
        self.tenant_netns = str(t["netns"])
        self.places = {"native": self.native, "netkernel": self.tenant}
        self.say(f"peer {PEER_NS} {PEER_V4}, native {NATIVE_NS} {NATIVE_V4}, tenant {TENANT} "
                 f"{t['ipv4']} (NSM {t['nsm']}); all on bridge {BRIDGE}")
        if any(c.name == LWIP for c in self.opts.configs):
            self.places[LWIP] = self._setup_lwip()
        for c in self.opts.configs:
            if c.host_ns is not None:
                self.places[c.name] = self._setup_usermode(c)
                self.say(f"{c.name}: sandbox {c.netns} behind {c.name} in {c.host_ns} "
                         f"{c.host_v4}, MTU {c.mtu}; started afresh for each run")

    def _setup_lwip(self) -> Place:
        """An lwIP NSM of our own and a tenant on it."""
        try:
            lwip_binary()
        except NetKernelError as e:
            raise BenchError(f"{LWIP}: {e} (or leave it out: --configs none)") from None
        self.made_lwip = True  # set first: an interrupted create may still have happened
        api.call("nsm-add", name=LWIP_NSM, kind="lwip")
        t = api.call("tenant-create", name=LWIP_TENANT, nsm=LWIP_NSM)["tenant"]
        self.say(f"{LWIP}: tenant {LWIP_TENANT} {t['ipv4']} on lwIP NSM {LWIP_NSM}")
        return Place(LWIP, str(t["ipv4"]), tenant=LWIP_TENANT)

    def _restart_usermode(self, c: Configuration, whole: bool) -> Place:
        """A new pasta or slirp4netns process with a new sandbox, for every run: slirp4netns
        slows down by an order of magnitude after tens of thousands of connections
        (measured: nginx `Connection: close` 7,112 req/s in a first 5-s run, 347 in the
        second against the same process) and, later, resets connections; that must be
        charged neither to the next run nor to the next workload. whole: the host namespace
        too (between workloads), and the peer forgets its old MAC address."""
        assert c.host_ns is not None and c.netns is not None
        p = self.usermode.pop(c.name, None)
        if p is not None:
            self.stop(p)
        gone = [c.netns] + ([c.host_ns] if whole else [])
        self._del_namespaces([n for n in gone if n in self.made_ns])
        self.made_ns = [n for n in self.made_ns if n not in gone]
        if whole:
            subprocess.run(["ip", "-n", PEER_NS, "neigh", "flush", "to", c.host_v4],
                           capture_output=True)
        self.places[c.name] = self._setup_usermode(c, fresh=whole)
        return self.places[c.name]

    def _setup_usermode(self, c: Configuration, fresh: bool = True) -> Place:
        """A sandbox namespace served by pasta or slirp4netns, which run in a host namespace
        of ours: their sockets reach the peer over the bridge and nothing else (no default
        route). nginx's and redis-server's ports are forwarded into the sandbox."""
        assert c.host_ns is not None and c.netns is not None
        sandbox = c.netns
        if fresh:
            self._attach_ns(c.host_ns, c.host_v4, c.host_v6)
        self.made_ns.append(sandbox)
        netns.netns_add(sandbox)
        netns.ip("link", "set", "lo", "up", netns=sandbox)
        host = Place(f"{c.name} host", c.host_v4, netns=c.host_ns)
        log = f"{c.name}.log"
        if c.name == "pasta":
            # As root pasta would switch to nobody, who may not join our namespace.
            p = self.spawn(host, ["pasta", "--runas", "0", "-f", "-q", "--config-net", "-4",
                                  "-m", str(c.mtu), "-i", "eth0", "-g", PASTA_GW,
                                  "-t", ",".join(map(str, USERMODE_PORTS)), "-u", "none",
                                  "-T", "none", "-U", "none", "--netns", sandbox], log)
            place = Place(c.name, c.host_v4, netns=sandbox)
            self._wait_sandbox(sandbox, c.host_v4, p, place, log)
        else:
            api_sock = self.tmp / f"{c.name}.sock"
            api_sock.unlink(missing_ok=True)
            p = self.spawn(host, ["slirp4netns", "--configure", f"--mtu={c.mtu}",
                                  "--disable-host-loopback", "--api-socket", str(api_sock),
                                  "--netns-type=path", f"/run/netns/{sandbox}", "tap0"], log)
            place = Place(c.name, c.host_v4, netns=sandbox, listen=SLIRP_GUEST_V4)
            self._wait_sandbox(sandbox, SLIRP_GUEST_V4, p, place, log)
            deadline = time.monotonic() + 10
            while not api_sock.exists() and time.monotonic() < deadline:
                time.sleep(0.05)  # created after the tap is configured
            for port in USERMODE_PORTS:
                self._slirp_forward(api_sock, c.host_v4, port, place)
        self.usermode[c.name] = p
        return place

    def _wait_sandbox(self, sandbox: str, addr: str, p: subprocess.Popen[bytes], place: Place,
                      log: str, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if p.poll() is not None:
                raise self._died(p, place, place.name, log)
            r = subprocess.run(["ip", "-n", sandbox, "-4", "-o", "addr", "show"],
                               capture_output=True, text=True)
            if f" {addr}/" in r.stdout:
                return
            time.sleep(0.1)
        raise BenchError(f"{place.name}: the sandbox has no address {addr} after {timeout:.0f}s:\n"
                         f"{_tail(self.log_text(log))}")

    def _slirp_forward(self, api_sock: Path, host_addr: str, port: int, place: Place) -> None:
        req = {"execute": "add_hostfwd", "arguments": {"proto": "tcp", "host_addr": host_addr,
                                                        "host_port": port, "guest_port": port}}
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.settimeout(5)
                s.connect(str(api_sock))
                s.sendall(json.dumps(req).encode())
                reply = json.loads(s.recv(4096) or b"{}")
        except (OSError, ValueError) as e:
            raise BenchError(f"{place.name}: forwarding port {port}: {e}") from None
        if "return" not in reply:
            raise BenchError(f"{place.name}: forwarding port {port}: {reply}")

    def _attach_ns(self, ns: str, v4: str, v6: str) -> None:
        """Like tests/conftest.py's peer_ns: a veth from the namespace to nk0."""
        self.made_ns.append(ns)
        netns.netns_add(ns)
        # Root-side veth named like the namespace (<= 15 bytes), the inner end is eth0.
        netns.ip("link", "add", ns, "type", "veth", "peer", "name", "eth0", "netns", ns)
        netns.ip("link", "set", ns, "master", BRIDGE, "up")
        netns.sysctl("net.ipv6.conf.eth0.accept_dad", "0", netns=ns)
        netns.addr_add("eth0", f"{v4}/{PREFIX_V4}", netns=ns)
        netns.addr_add("eth0", f"{v6}/{PREFIX_V6}", netns=ns)  # nodad
        netns.ip("link", "set", "eth0", "up", netns=ns)

    def _remove_leftovers(self) -> None:
        """An aborted earlier run (kill -9) may have left our namespaces or tenant."""
        ours = [PEER_NS, NATIVE_NS, NOISY_NS]
        for c in CONFIGS:
            if c.host_ns is not None:
                ours += [c.host_ns, c.netns or ""]
        stale = [n for n in netns.netns_list() if n in ours]
        if stale:
            self.say(f"removing leftovers of an earlier run: {', '.join(stale)}")
            self._del_namespaces(stale)
        for link in ours:
            netns.link_del(link)
        stale_mux = [n for n in netns.netns_list() if n.startswith(MUX_NS)]
        if stale_mux:
            self._del_namespaces(stale_mux)
        for t in api.call("ps").get("tenants", []):
            name = str(t.get("name"))
            if name in (TENANT, NOISY_TENANT, LWIP_TENANT) or name.startswith(MUX_TENANT):
                self.say(f"removing tenant {t['name']} left by an earlier run")
                api.call("tenant-delete", name=t["name"])
        if any(n.get("name") == LWIP_NSM for n in api.call("nsm-list").get("nsms", [])):
            self.say(f"removing NSM {LWIP_NSM} left by an earlier run")
            api.call("nsm-remove", name=LWIP_NSM)

    @staticmethod
    def _del_namespaces(names: list[str]) -> None:
        netns.kill_netns_processes(names)
        for n in names:
            netns.netns_del(n)
            netns.link_del(n)

    def cleanup(self) -> list[str]:
        """Undo everything; never raises. Returns what went wrong (for a warning)."""
        problems: list[str] = []
        for p in list(self.procs):
            try:
                self.stop(p, timeout=5)
            except Exception as e:  # keep cleaning
                problems.append(f"stopping pid {p.pid}: {e}")
        tenants = [(self.made_tenant, TENANT), (self.made_noisy_tenant, NOISY_TENANT),
                   (self.colo_server is not None, COLO_TENANT), (self.made_lwip, LWIP_TENANT)]
        tenants += [(True, name) for name in self.mux_tenants]
        for made, name in tenants:
            if not made:
                continue
            try:
                if any(t.get("name") == name for t in api.call("ps").get("tenants", [])):
                    api.call("tenant-delete", name=name)
            except NetKernelError as e:
                if api.ping() is not None:  # a daemon that died took the tenant with it
                    problems.append(f"deleting tenant {name}: {e}")
        if self.made_lwip:
            try:
                if any(n.get("name") == LWIP_NSM for n in api.call("nsm-list").get("nsms", [])):
                    api.call("nsm-remove", name=LWIP_NSM)
            except NetKernelError as e:
                if api.ping() is not None:
                    problems.append(f"removing NSM {LWIP_NSM}: {e}")
        try:
            self._del_namespaces(list(self.made_ns))
        except Exception as e:
            problems.append(f"removing namespaces: {e}")
        left = [n for n in netns.netns_list() if n in self.made_ns]
        if left:
            problems.append(f"namespaces still present: {', '.join(left)}")
        if self.started_daemon:
            r = subprocess.run([sys.executable, "-m", "netkernel", "down"], capture_output=True,
                               text=True, timeout=120)
            if r.returncode != 0:
                problems.append(f"`netkernel down` failed: {r.stdout}{r.stderr}")
        shutil.rmtree(self.tmp, ignore_errors=True)
        return problems

    # -- measurements -----------------------------------------------------------------------
    def sides(self, rep: int, m: Metric | None = None) -> Iterator[Place]:
        """The configurations in this repetition's order: rotated each time, so that each
        goes first in turn and drift favours none. A user-mode peer is restarted before each
        of its runs (the first run of the first workload has it fresh from setup)."""
        configs = configs_of(m, self.opts.configs) if m else [c for c in CONFIGS if c.name in SIDES]
        k = rep % len(configs)
        for c in configs[k:] + configs[:k]:
            if c.host_ns is not None and c.name in self.usermode_used:
                yield self._restart_usermode(c, whole=rep == 0)
            else:
                self.usermode_used.add(c.name)
                yield self.places[c.name]

    @contextmanager
    def attempt(self, res: MetricResult, place: Place, rep: int) -> Iterator[None]:
        """One run. A failed run of pasta or slirp4netns is recorded for that configuration
        (slirp4netns sometimes resets redis-benchmark's connections) and the workload goes
        on; a failed native or NetKernel run fails the workload."""
        try:
            yield
        except BenchError as e:
            if place.name not in PEERS:
                raise
            first = str(e).splitlines()[0]
            res.peer_errors.setdefault(place.name, []).append(str(e))
            self.progress(res.metric, place, rep, f"FAILED (recorded, the workload goes on): {first}")

    @contextmanager
    def engine_load(self, place: Place) -> Iterator[None]:
        """While a run's load is on: the machine's busy cores (everything the configuration
        and the load generator use, from /proc/stat) and, for NetKernel, the engine's CPU
        (percent of one core)."""
        pid = self.engine_pid if place.tenant is not None else None
        t0, (idle0, _) = time.monotonic(), machine_idle_seconds()
        before = None
        if pid is not None:
            try:
                before = proc_cpu_ticks(pid)
            except (OSError, IndexError, ValueError):
                pass
        yield
        hz = os.sysconf("SC_CLK_TCK")
        elapsed = max(time.monotonic() - t0, 1e-6)
        idle1, cpus = machine_idle_seconds()
        self._cpu.setdefault(place.name, []).append(max(0.0, cpus - (idle1 - idle0) / elapsed))
        if before is None or pid is None:
            return
        try:
            ticks = proc_cpu_ticks(pid) - before
        except (OSError, IndexError, ValueError):
            return
        self._engine_cpu.append(ticks / hz / elapsed * 100.0)

    def progress(self, m: Metric, place: Place, rep: int, text: str) -> None:
        self.step += 1
        width = len(str(self.total_steps))
        self.say(f"[{self.step:>{width}}/{self.total_steps}] {m.name:<22} {place.name:<16} "
                 f"run {rep + 1}/{self.opts.repetitions}: {text}")

    def measure(self, m: Metric) -> MetricResult:
        res = MetricResult(m)
        self._engine_cpu = []
        self._cpu = {}
        fn: dict[str, Callable[[MetricResult], None]] = {
            "iperf3_tcp_gbps": lambda r: self.m_iperf3(r, streams=1, receive=False),
            "iperf3_tcp_p4_gbps": lambda r: self.m_iperf3(r, streams=4, receive=False),
            "iperf3_tcp_rx_gbps": lambda r: self.m_iperf3(r, streams=1, receive=True),
            "iperf3_tcp_rx_p4_gbps": lambda r: self.m_iperf3(r, streams=4, receive=True),
            "tcp_rr_p50_us": self.m_sockperf,
            "tcp_crr_rps": self.m_crr,
            "nginx_keepalive_rps": lambda r: self.m_nginx(r, close=False),
            "nginx_close_rps": lambda r: self.m_nginx(r, close=True),
            "nginx_1m_keepalive_rps": lambda r: self.m_nginx(r, close=False, path="1m.bin"),
            "nginx_1m_close_rps": lambda r: self.m_nginx(r, close=True, path="1m.bin"),
            "redis_get_rps": lambda r: self.m_redis(r, "get"),
            "redis_set_rps": lambda r: self.m_redis(r, "set"),
            "noisy_neighbour_kept": self.m_noisy,
            **{f"mux{n}_gbps": functools.partial(self.m_mux, n=n) for n in (1, 4, 16)},
            "colo_iperf3_gbps": self.m_colo_iperf3,
            "colo_tcp_rr_p50_us": self.m_colo_sockperf,
            "colo_nginx_keepalive_rps": self.m_colo_nginx,
            "colo_tcp_crr_rps": self.m_colo_crr,
            "colo_redis_get_rps": self.m_colo_redis,
        }
        try:
            fn[m.name](res)
        except BenchError as e:
            res.error = str(e)
            self.say(f"{m.name}: FAILED: {e}")
            self.step = self._steps_through(m)
        if self._engine_cpu:
            res.extra["netkernel_engine_cpu_percent"] = round(median(self._engine_cpu) or 0.0, 1)
        if m.name != "noisy_neighbour_kept":  # there the load is the flood, not the workload
            for name, cores in self._cpu.items():
                res.extra[f"{name}_cpu_cores"] = round(median(cores) or 0.0, 3)
        return res

    def _steps_through(self, m: Metric | None) -> int:
        """Progress steps up to and including metric m (None: all of them)."""
        n = 0
        for x in self.opts.metrics:
            if x.name != IDLE:
                n += self.opts.repetitions * len(configs_of(x, self.opts.configs))
            if x is m:
                break
        return n

    def _peer_server(self, cmd: Sequence[str], port: int, what: str) -> subprocess.Popen[bytes]:
        log = f"{what}-peer.log"
        p = self.spawn(self.peer, cmd, log)
        self.wait_listening(PEER_NS, port, p, self.peer, what, log)
        return p

    def m_iperf3(self, res: MetricResult, streams: int, receive: bool) -> None:
        d = self.opts.duration
        server = self._peer_server(["iperf3", "-s", "-p", str(IPERF3_PORT), "-B", PEER_V4],
                                   IPERF3_PORT, "iperf3-server")
        retrans: dict[str, float] = {s: 0.0 for s in CONFIG_NAMES}
        try:
            for rep in range(self.opts.repetitions):
                for place in self.sides(rep, res.metric):
                    with self.attempt(res, place, rep):
                        cmd = ["iperf3", "-c", PEER_V4, "-p", str(IPERF3_PORT), "-t", str(d), "-J",
                               "--connect-timeout", "5000", "-P", str(streams)]
                        if receive:
                            cmd.append("-R")
                        out = ""
                        with self.engine_load(place):
                            for _attempt in range(10):  # the server may still be finishing the last test
                                out = self.run(place, cmd, d + 60, "iperf3 client")
                                if "server is busy" not in out:
                                    break
                                time.sleep(0.5)
                        try:
                            r = parse_iperf3(out)
                        except ParseError as e:
                            raise BenchError(f"{e} ({place.name})" + self._log_hint(place)) from None
                        res.samples[place.name].append(r["gbps"])
                        retrans[place.name] += r["retransmits"]
                        self.progress(res.metric, place, rep, f"{r['gbps']:.2f} Gbit/s")
                        if server.poll() is not None:
                            raise self._died(server, self.peer, "iperf3 server", "iperf3-server-peer.log")
        finally:
            self.stop(server)
        for c in configs_of(res.metric, self.opts.configs):
            res.extra[f"{c.name}_retransmits"] = int(retrans[c.name])

    def m_sockperf(self, res: MetricResult) -> None:
        d = self.opts.duration
        server = self._peer_server(["sockperf", "server", "--tcp", "-i", PEER_V4, "-p",
                                    str(SOCKPERF_PORT)], SOCKPERF_PORT, "sockperf-server")
        p99: dict[str, list[float]] = {s: [] for s in CONFIG_NAMES}
        try:
            for rep in range(self.opts.repetitions):
                for place in self.sides(rep, res.metric):
                    with self.attempt(res, place, rep):
                        with self.engine_load(place):
                            out = self.run(place, ["sockperf", "ping-pong", "--tcp", "-m", "64", "-t",
                                                   str(d), "-i", PEER_V4, "-p", str(SOCKPERF_PORT)],
                                           d + 60, "sockperf ping-pong")
                        try:
                            r = parse_sockperf(out)
                        except ParseError as e:
                            raise BenchError(f"{e} ({place.name})" + self._log_hint(place)) from None
                        res.samples[place.name].append(r["p50_us"])
                        if "p99_us" in r:
                            p99[place.name].append(r["p99_us"])
                        self.progress(res.metric, place, rep, f"p50 {r['p50_us']:.1f} us")
        finally:
            self.stop(server, signal.SIGINT)
        for c in configs_of(res.metric, self.opts.configs):
            res.extra[f"{c.name}_p99_us"] = median(p99[c.name])

    def _crr_prog(self) -> Path:
        """netkernel-crr, copied where a tenant's users may run it (the package may be under
        a directory only root enters)."""
        prog = libdir() / "netkernel-crr"
        if not os.access(prog, os.X_OK):
            raise BenchError(f"{prog} not found (reinstall with `pip install .`, or set "
                             "NETKERNEL_LIBDIR to a build directory)")
        copy = self.tmp / "netkernel-crr"
        if not copy.exists():
            shutil.copy(prog, copy)
            copy.chmod(0o755)
        return copy

    @staticmethod
    def _crr_rate(out: str) -> tuple[float, int] | None:
        """netkernel-crr's report → (connections/s, errors), None without a rate."""
        m = re.search(r"^connections/s ([0-9.]+)$", out, re.M)
        e = re.search(r"^errors (\d+)$", out, re.M)
        return (float(m[1]), int(e[1]) if e else 0) if m else None

    @staticmethod
    def _note_crr_errors(res: MetricResult, side: str, out: str, n_err: int) -> None:
        """Count netkernel-crr's failed connections for side, and keep the step and errno
        the client printed for its first few (a count alone says nothing about which call)."""
        res.extra[f"{side}_connection_errors"] = res.extra.get(f"{side}_connection_errors", 0) + n_err
        lines = re.findall(r"^netkernel-crr: (\w+: .*)$", out, re.M)
        if lines:
            key = f"{side}_connection_error_lines"
            res.extra[key] = (res.extra.get(key, []) + lines)[:5]

    def m_crr(self, res: MetricResult) -> None:
        prog = self._crr_prog()
        d = self.opts.duration
        server = self._peer_server([str(prog), "server", PEER_V4, str(CRR_PORT)], CRR_PORT,
                                   "crr-server")
        try:
            for rep in range(self.opts.repetitions):
                for place in self.sides(rep, res.metric):
                    with self.attempt(res, place, rep):
                        with self.engine_load(place):
                            out = self.run(place, [str(prog), "client", PEER_V4, str(CRR_PORT), str(d),
                                                   str(CRR_THREADS)], d + 60, "netkernel-crr client")
                        got = self._crr_rate(out)
                        if not got:
                            raise BenchError(f"netkernel-crr: no 'connections/s' ({place.name}):\n"
                                             f"{_tail(out)}" + self._log_hint(place))
                        rate, n_err = got
                        self._note_crr_errors(res, place.name, out, n_err)
                        res.samples[place.name].append(rate)
                        self.progress(res.metric, place, rep, f"{rate:,.0f} connections/s")
                        if server.poll() is not None:
                            raise self._died(server, self.peer, "netkernel-crr server",
                                             "crr-server-peer.log")
        finally:
            self.stop(server)

    def _nginx_files(self) -> None:
        www = self.tmp / "www"
        if (www / "1k.bin").exists():
            return
        www.mkdir(exist_ok=True)
        www.chmod(0o755)
        for name, size in (("1k.bin", 1024), ("1m.bin", 1 << 20)):
            f = www / name
            f.write_bytes(os.urandom(size))
            f.chmod(0o644)

    def _nginx_scratch(self, side: str) -> Path:
        """The error log and temp directory of one side's nginx, fresh, writable by a
        tenant's nginx too (its root is not the host's); returns the error log."""
        temp = self.tmp / f"tmp-{side}"
        shutil.rmtree(temp, ignore_errors=True)
        temp.mkdir()
        temp.chmod(0o1777)
        errlog = self.tmp / f"nginx-{side}.error.log"
        errlog.write_bytes(b"")
        errlog.chmod(0o666)
        return errlog

    def m_nginx(self, res: MetricResult, close: bool, path: str = "1k.bin") -> None:
        self._nginx_files()
        d = self.opts.duration
        errors: dict[str, dict[str, int]] = {
            s: {"connect": 0, "read": 0, "write": 0, "timeout": 0} for s in CONFIG_NAMES}
        non2xx = {s: 0 for s in CONFIG_NAMES}
        error_log_lines: dict[str, list[str]] = {s: [] for s in CONFIG_NAMES}
        for rep in range(self.opts.repetitions):
            for place in self.sides(rep, res.metric):
                with self.attempt(res, place, rep):
                    conf = self.tmp / f"nginx-{place.name}.conf"
                    listen = url_host(place.listen or place.addr)
                    conf.write_text(NGINX_CONF.format(d=self.tmp, side=place.name,
                                                      listen=f"{listen}:{HTTP_PORT}"))
                    errlog = self._nginx_scratch(place.name)
                    log = f"nginx-{place.name}.log"
                    server = self.spawn(place, ["nginx", "-p", str(self.tmp), "-c", str(conf),
                                                "-e", str(errlog)], log)
                    try:
                        self.wait_accepting(place.addr, HTTP_PORT, server, place, "nginx", log)
                        cmd = ["wrk", "-t1", f"-c{WRK_CONNECTIONS}", f"-d{d}s"]
                        if close:
                            cmd += ["-H", "Connection: close"]
                        cmd.append(f"http://{url_host(place.addr)}:{HTTP_PORT}/{path}")
                        with self.engine_load(place):
                            out = self.run(self.peer, cmd, d + 60, f"wrk against nginx ({place.name})")
                        r = self._parse_against(parse_wrk, out, server, place, "nginx", log)
                    finally:
                        self.stop(server)
                    res.samples[place.name].append(r.requests_per_sec)
                    for k, v in r.socket_errors.items():
                        errors[place.name][k] += v
                    non2xx[place.name] += r.non_2xx_3xx
                    bad = [ln for ln in errlog.read_text(errors="replace").splitlines()
                           if re.search(r"\[(error|crit|alert|emerg)\]", ln)]
                    error_log_lines[place.name] += bad
                    note = ""
                    if r.total_socket_errors or r.non_2xx_3xx:
                        note = (f" (socket errors {r.total_socket_errors}, "
                                f"non-2xx/3xx {r.non_2xx_3xx})")
                    self.progress(res.metric, place, rep, f"{r.requests_per_sec:,.0f} req/s{note}")
        for c in configs_of(res.metric, self.opts.configs):
            s = c.name
            res.extra[f"{s}_socket_errors"] = errors[s]
            res.extra[f"{s}_non_2xx_3xx"] = non2xx[s]
            res.extra[f"{s}_nginx_error_log"] = error_log_lines[s][:5]
            res.extra[f"{s}_nginx_error_log_lines"] = len(error_log_lines[s])

    def _parse_against(self, parse: Callable[[str], T], out: str, server: subprocess.Popen[bytes],
                       place: Place, what: str, log: str) -> T:
        """The load generator's figure, from a run against a server of ours in place; an
        error if the figure is missing or the server died during the run."""
        try:
            value = parse(out)
        except ParseError as e:
            raise BenchError(f"{e} (against {what} in {place.name})" + self._log_hint(place)) from None
        if server.poll() is not None:
            raise BenchError(f"{what} ({place.name}) died during the run:\n"
                             f"{_tail(self.log_text(log))}" + self._log_hint(place))
        return value

    def m_redis(self, res: MetricResult, test: str) -> None:
        for rep in range(self.opts.repetitions):
            for place in self.sides(rep, res.metric):
                with self.attempt(res, place, rep):
                    log = f"redis-{place.name}.log"
                    server = self.spawn(place, ["redis-server", "--save", "", "--appendonly", "no",
                                                "--protected-mode", "no", "--port", str(REDIS_PORT)], log)
                    try:
                        self.wait_accepting(place.addr, REDIS_PORT, server, place, "redis-server", log)
                        # Its connection loop never gives up, hence the timeout (and the wait above).
                        with self.engine_load(place):
                            out = self.run(self.peer, ["redis-benchmark", "-h", place.addr,
                                                       "-p", str(REDIS_PORT), "-t", test,
                                                       "-n", str(self.redis_requests),
                                                       "-c", str(REDIS_CLIENTS),
                                                       "--csv"],
                                           300, f"redis-benchmark against redis-server ({place.name})")
                        rps = self._parse_against(lambda o: parse_redis_benchmark(o, test.upper()),
                                                  out, server, place, "redis-server", log)
                    finally:
                        self.stop(server)
                    res.samples[place.name].append(rps)
                    self.progress(res.metric, place, rep, f"{rps:,.0f} req/s")

    def _mux_places(self, n: int) -> dict[str, list[Place]]:
        """n native namespaces and n tenants (made once, for the largest n first asked)."""
        have = len(self.mux_tenants)
        for i in range(have, n):
            ns = f"{MUX_NS}{i}"
            self._attach_ns(ns, f"198.19.254.{i + 1}", f"fd6e:6b00::ff:{0xe0 + i:x}")
            name = f"{MUX_TENANT}{i}"
            self.mux_tenants.append(name)  # first: an interrupted create may still have happened
            api.call("tenant-create", name=name)
        t = {x.get("name"): x for x in api.call("ps").get("tenants", [])}
        return {"native": [Place("native", f"198.19.254.{i + 1}", netns=f"{MUX_NS}{i}")
                           for i in range(n)],
                "netkernel": [Place("netkernel", str(t[f"{MUX_TENANT}{i}"]["ipv4"]).split("/")[0],
                                    tenant=f"{MUX_TENANT}{i}") for i in range(n)]}

    def m_mux(self, res: MetricResult, n: int) -> None:
        """n sandboxes each running one iperf3 stream to its own server in the peer, all at
        once; the sample is the sum. NetKernel: n tenants served by the one engine thread."""
        d = self.opts.duration
        places = self._mux_places(n)
        servers = [self._peer_server(["iperf3", "-s", "-p", str(MUX_PORT + i), "-B", PEER_V4],
                                     MUX_PORT + i, f"iperf3-server-{i}") for i in range(n)]
        try:
            for rep in range(self.opts.repetitions):
                for side in self.sides(rep):
                    clients = []
                    with self.engine_load(side):
                        for i, place in enumerate(places[side.name]):
                            cmd = ["iperf3", "-c", PEER_V4, "-p", str(MUX_PORT + i), "-t", str(d),
                                   "-J", "--connect-timeout", "5000"]
                            log = f"mux-{side.name}-{i}.json"
                            clients.append((self.spawn(place, cmd, log), log, place))
                        for p, _, place in clients:
                            try:
                                p.wait(timeout=d + 60)
                            except subprocess.TimeoutExpired:
                                raise BenchError(f"iperf3 client ({place.name} {place.addr}) did "
                                                 f"not finish within {d + 60}s") from None
                    total = 0.0
                    for p, log, place in clients:
                        self.procs.remove(p)
                        try:
                            total += parse_iperf3(self.log_text(log))["gbps"]
                        except ParseError as e:
                            raise BenchError(f"{e} ({place.name} {place.addr})"
                                             + self._log_hint(place)) from None
                    res.samples[side.name].append(total)
                    self.progress(res.metric, side, rep, f"{total:.2f} Gbit/s from {n} at once")
        finally:
            for srv in servers:
                self.stop(srv)

    # -- colocated: both ends on this host -------------------------------------------------
    def _colo(self, side: Place) -> tuple[Place, Place, str]:
        """(client, server, the address the client dials) for one side: native is one
        namespace over loopback; NetKernel is our tenant dialling a second tenant."""
        if side.tenant is None:
            return self.native, self.native, "127.0.0.1"
        assert self.tenant is not None
        if self.colo_server is None:
            self.colo_server = Place("netkernel", "", tenant=COLO_TENANT)  # first: see cleanup
            t = api.call("tenant-create", name=COLO_TENANT)["tenant"]
            self.colo_server = Place("netkernel", str(t["ipv4"]), tenant=COLO_TENANT)
        return self.tenant, self.colo_server, self.colo_server.addr

    @staticmethod
    def _colo_log(server: Place, what: str) -> str:
        return f"{what}-{server.tenant or 'native'}.log"

    def _colo_start(self, server: Place, cmd: Sequence[str], port: int, what: str) -> subprocess.Popen[bytes]:
        """A server for a colocated run, waited for without a probe connection (iperf3 would
        count one as its test): ss in the namespace, or the engine's listener list."""
        log = self._colo_log(server, what)
        p = self.spawn(server, cmd, log)
        if server.tenant is None:
            self.wait_listening(NATIVE_NS, port, p, server, what, log)
            return p
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if p.poll() is not None:
                raise self._died(p, server, what, log)
            if any(c.get("kind") == "listener" and str(c.get("local", "")).endswith(f":{port}")
                   for c in api.call("conns", tenant=COLO_TENANT)["conns"]):
                return p
            time.sleep(0.1)
        raise BenchError(f"{what} (tenant {COLO_TENANT}) not listening on port {port} after 20s:\n"
                         f"{_tail(self.log_text(log))}")

    @staticmethod
    def _nsm_bytes() -> int:
        return sum(int(n.get("tx_bytes") or 0) + int(n.get("rx_bytes") or 0)
                   for n in api.call("nsm-list").get("nsms", []))

    @contextmanager
    def _colo_load(self, res: MetricResult, side: Place) -> Iterator[None]:
        """engine_load, and for NetKernel the bytes that went through an NSM meanwhile: on
        the shared-memory path, none (recorded, so a run that fell back shows)."""
        before = self._nsm_bytes() if side.tenant is not None else 0
        with self.engine_load(side):
            yield
        if side.tenant is not None:
            res.extra["netkernel_nsm_bytes"] = res.extra.get("netkernel_nsm_bytes", 0) + \
                self._nsm_bytes() - before

    def m_colo_iperf3(self, res: MetricResult) -> None:
        d = self.opts.duration
        for rep in range(self.opts.repetitions):
            for side in self.sides(rep, res.metric):
                client, server, addr = self._colo(side)
                srv = self._colo_start(server, ["iperf3", "-s", "-1", "-p", str(COLO_PORT), "-B", addr],
                                       COLO_PORT, "colo-iperf3-server")
                try:
                    cmd = ["iperf3", "-c", addr, "-p", str(COLO_PORT), "-t", str(d), "-J",
                           "--connect-timeout", "5000"]
                    with self._colo_load(res, side):
                        out = self.run(client, cmd, d + 60, "iperf3 client (colocated)")
                finally:
                    self.stop(srv)
                try:
                    gbps = parse_iperf3(out)["gbps"]
                except ParseError as e:
                    raise BenchError(f"{e} ({side.name}, colocated)" + self._log_hint(side)) from None
                res.samples[side.name].append(gbps)
                self.progress(res.metric, side, rep, f"{gbps:.2f} Gbit/s")

    def m_colo_sockperf(self, res: MetricResult) -> None:
        d = self.opts.duration
        port = COLO_PORT + 1
        for rep in range(self.opts.repetitions):
            for side in self.sides(rep, res.metric):
                client, server, addr = self._colo(side)
                srv = self._colo_start(server, ["sockperf", "server", "--tcp", "-i", addr, "-p", str(port)],
                                       port, "colo-sockperf-server")
                try:
                    with self._colo_load(res, side):
                        out = self.run(client, ["sockperf", "ping-pong", "--tcp", "-m", "64", "-t", str(d),
                                                "-i", addr, "-p", str(port)], d + 60,
                                       "sockperf ping-pong (colocated)")
                finally:
                    self.stop(srv, signal.SIGINT)
                try:
                    p50 = parse_sockperf(out)["p50_us"]
                except ParseError as e:
                    raise BenchError(f"{e} ({side.name}, colocated)" + self._log_hint(side)) from None
                res.samples[side.name].append(p50)
                self.progress(res.metric, side, rep, f"p50 {p50:.1f} us")

    def m_colo_nginx(self, res: MetricResult) -> None:
        self._nginx_files()
        d = self.opts.duration
        port = COLO_PORT + 2
        for rep in range(self.opts.repetitions):
            for side in self.sides(rep, res.metric):
                client, server, addr = self._colo(side)
                conf = self.tmp / f"nginx-colo-{side.name}.conf"
                conf.write_text(NGINX_CONF.format(d=self.tmp, side=f"colo-{side.name}",
                                                  listen=f"{url_host(addr)}:{port}"))
                errlog = self._nginx_scratch(f"colo-{side.name}")
                srv = self._colo_start(server, ["nginx", "-p", str(self.tmp), "-c", str(conf), "-e",
                                                str(errlog)], port, "colo-nginx")
                try:
                    cmd = ["wrk", "-t1", f"-c{WRK_CONNECTIONS}", f"-d{d}s",
                           f"http://{url_host(addr)}:{port}/1k.bin"]
                    with self._colo_load(res, side):
                        out = self.run(client, cmd, d + 60, "wrk against nginx (colocated)")
                    r = self._parse_against(parse_wrk, out, srv, server, "nginx",
                                            self._colo_log(server, "colo-nginx"))
                finally:
                    self.stop(srv)
                if r.total_socket_errors or r.non_2xx_3xx:
                    raise BenchError(f"wrk against nginx ({side.name}, colocated): socket errors "
                                     f"{r.socket_errors}, non-2xx/3xx {r.non_2xx_3xx}")
                res.samples[side.name].append(r.requests_per_sec)
                self.progress(res.metric, side, rep, f"{r.requests_per_sec:,.0f} req/s")

    def m_colo_crr(self, res: MetricResult) -> None:
        prog = self._crr_prog()
        d = self.opts.duration
        port = COLO_PORT + 3
        for rep in range(self.opts.repetitions):
            for side in self.sides(rep, res.metric):
                client, server, addr = self._colo(side)
                srv = self._colo_start(server, [str(prog), "server", addr, str(port)], port,
                                       "colo-crr-server")
                try:
                    with self._colo_load(res, side):
                        out = self.run(client, [str(prog), "client", addr, str(port), str(d),
                                                str(CRR_THREADS)], d + 60,
                                       "netkernel-crr client (colocated)")
                finally:
                    self.stop(srv)
                got = self._crr_rate(out)
                if not got:
                    raise BenchError(f"netkernel-crr: no 'connections/s' ({side.name}, colocated):\n"
                                     f"{_tail(out)}" + self._log_hint(side))
                rate, n_err = got
                self._note_crr_errors(res, side.name, out, n_err)
                res.samples[side.name].append(rate)
                self.progress(res.metric, side, rep, f"{rate:,.0f} connections/s")

    def m_colo_redis(self, res: MetricResult) -> None:
        port = COLO_PORT + 4
        for rep in range(self.opts.repetitions):
            for side in self.sides(rep, res.metric):
                client, server, addr = self._colo(side)
                srv = self._colo_start(server, ["redis-server", "--save", "", "--appendonly", "no",
                                                "--protected-mode", "no", "--bind", addr,
                                                "--port", str(port)], port, "colo-redis")
                try:
                    with self._colo_load(res, side):
                        out = self.run(client, ["redis-benchmark", "-h", addr, "-p", str(port),
                                                "-t", "get", "-n", str(self.redis_requests),
                                                "-c", str(REDIS_CLIENTS), "--csv"], 300,
                                       "redis-benchmark (colocated)")
                    rps = self._parse_against(lambda o: parse_redis_benchmark(o, "GET"), out, srv,
                                              server, "redis-server", self._colo_log(server, "colo-redis"))
                finally:
                    self.stop(srv)
                res.samples[side.name].append(rps)
                self.progress(res.metric, side, rep, f"{rps:,.0f} req/s")

    def _noisy_places(self) -> tuple[Place, Place]:
        """Where the floods come from: a namespace of their own (native) and a second tenant."""
        if NOISY_NS not in self.made_ns:
            self._attach_ns(NOISY_NS, NOISY_V4, NOISY_V6)
        self.made_noisy_tenant = True
        t = api.call("tenant-create", name=NOISY_TENANT)["tenant"]
        return Place("native", NOISY_V4, netns=NOISY_NS), Place("netkernel", str(t["ipv4"]),
                                                              tenant=NOISY_TENANT)

    def m_noisy(self, res: MetricResult) -> None:
        """Per side and repetition: the quiet ping-pong alone and beside the flood, in
        NOISY_PAIRS alternating pairs with the flood's programs stopped (SIGSTOP) for the
        "alone" half; the sample is the rate kept (sum beside / sum alone). Pairs a few seconds
        apart compare like with like: on this kind of VM a ping-pong's rate alone moves by 2x
        from one minute to the next. The flood's programs run at the lowest CPU priority (in a
        tenant: its cgroup's weight), so what is compared is the stacks' isolation, not the
        CPU scheduler's. For the tenant the pairs are run again with the flood coming from
        outside NetKernel (the native flood's namespace): a control, in the JSON, for how
        much of the loss the engine causes."""
        assert self.tenant is not None
        d = max(1, min(self.opts.duration, 6) // 2)
        noisy_native, noisy_nk = self._noisy_places()
        sink = self._peer_server(["nice", "-n", "19", PYTHON, "-c", SINK_PROG, PEER_V4,
                                  str(SINK_PORT)], SINK_PORT, "sink")
        lowest_priority(sink.pid)
        server = self._peer_server(["sockperf", "server", "--tcp", "-i", PEER_V4, "-p",
                                    str(SOCKPERF_PORT)], SOCKPERF_PORT, "sockperf-server")

        def rate(place: Place) -> float:
            out = self.run(place, ["sockperf", "ping-pong", "--tcp", "-m", "64", "-t", str(d),
                                   "-i", PEER_V4, "-p", str(SOCKPERF_PORT)], d + 60,
                           "sockperf ping-pong")
            try:
                r = parse_sockperf(out)
            except ParseError as e:
                raise BenchError(f"{e} ({place.name})" + self._log_hint(place)) from None
            if not r.get("avg_us"):
                raise BenchError(f"sockperf: no 'avg-latency' figure ({place.name})\n{_tail(out)}")
            return 1e6 / (2 * r["avg_us"])  # sockperf's latency is half the round trip

        def pairs(place: Place, noisy: Place) -> tuple[float, float, dict[str, float]]:
            """NOISY_PAIRS alone/beside pairs against a flood from noisy: the summed rates
            and, for a flood from a tenant, where the engine's time went while it ran."""
            log = f"flood-{noisy.name}.log"
            flood = self.spawn(noisy, ["nice", "-n", "19", PYTHON, "-c", FLOOD_PROG,
                                       PEER_V4, str(SINK_PORT), "3600"], log)
            lowest_priority(flood.pid)
            if noisy.tenant:
                lowest_tenant_priority(noisy.tenant)
            a = b = 0.0
            moved: dict[str, float] = {}
            try:
                time.sleep(2)  # connected and flooding
                for _ in range(NOISY_PAIRS):
                    if flood.poll() is not None:
                        raise self._died(flood, noisy, "flood", log)
                    os.killpg(flood.pid, signal.SIGSTOP)
                    time.sleep(0.5)  # let the stack drain what the flood left queued
                    a += rate(place)
                    os.killpg(flood.pid, signal.SIGCONT)
                    time.sleep(0.5)
                    before = self._engine_split() if noisy.tenant else None
                    with self.engine_load(place):
                        b += rate(place)
                    if before is not None:
                        for k, v in self._engine_split().items():
                            moved[k] = moved.get(k, 0.0) + v - before.get(k, 0.0)
            finally:
                if flood.poll() is None:
                    os.killpg(flood.pid, signal.SIGCONT)
                self.stop(flood)
            time.sleep(1)
            return a, b, moved

        alone: dict[str, list[float]] = {s: [] for s in SIDES}
        beside: dict[str, list[float]] = {s: [] for s in SIDES}
        split: dict[str, list[float]] = {"quiet_engine_seconds": [], "noisy_engine_seconds": [],
                                          "noisy_rounds_sat_out": []}
        outside: list[float] = []
        try:
            for rep in range(self.opts.repetitions):
                for place in self.sides(rep):
                    a, b, moved = pairs(place, noisy_nk if place.tenant else noisy_native)
                    for k, v in moved.items():
                        split[k].append(round(v, 3))
                    alone[place.name].append(round(a / NOISY_PAIRS))
                    beside[place.name].append(round(b / NOISY_PAIRS))
                    res.samples[place.name].append(b / a)
                    text = (f"{a / NOISY_PAIRS:,.0f} round trips/s alone, {b / NOISY_PAIRS:,.0f} "
                            f"beside the flood ({NOISY_PAIRS} pairs): kept {b / a:.2f}")
                    if place.tenant:
                        # The control: the same flood from the native namespace, which never
                        # enters NetKernel. What the tenant loses to it is the machine's share
                        # (CPUs, the sink's kernel work), not the engine's.
                        a2, b2, _ = pairs(place, noisy_native)
                        outside.append(round(b2 / a2, 3))
                        text += f"; beside a flood outside NetKernel: kept {b2 / a2:.2f}"
                    self.progress(res.metric, place, rep, text)
        finally:
            self.stop(server, signal.SIGINT)
            self.stop(sink)
        for side in SIDES:
            res.extra[f"{side}_alone_rt_per_s"] = alone[side]
            res.extra[f"{side}_beside_rt_per_s"] = beside[side]
        res.extra["netkernel_kept_beside_flood_outside_netkernel"] = outside
        # Where the engine's time went while the quiet tenant ran beside the flood.
        res.extra.update({f"netkernel_{k}": v for k, v in split.items()})

    @staticmethod
    def _engine_split() -> dict[str, float]:
        ps = {t.get("name"): t for t in api.call("ps").get("tenants", [])}
        q, n = ps.get(TENANT, {}), ps.get(NOISY_TENANT, {})
        return {"quiet_engine_seconds": float(q.get("engine_seconds") or 0.0),
                "noisy_engine_seconds": float(n.get("engine_seconds") or 0.0),
                "noisy_rounds_sat_out": float(n.get("engine_skips") or 0)}

    def m_idle(self) -> IdleResult:
        assert self.tenant is not None
        res = IdleResult()
        try:
            status = api.ping()
            if status is None:
                raise BenchError("the daemon is not running any more")
            daemon_pid, engine_pid = int(status["pid"]), int(status["engine_pid"])
            log = "idle-netkernel.log"
            server = self.spawn(self.tenant, [PYTHON, "-c", IDLE_PROG, self.tenant.addr,
                                              str(IDLE_PORT)], log)
            try:
                self.wait_accepting(self.tenant.addr, IDLE_PORT, server, self.tenant,
                                    "idle listener", log)

                addr = self.tenant.addr

                def connect() -> socket.socket:
                    return socket.create_connection((addr, IDLE_PORT), timeout=5)

                held = netns.run_in_netns(PEER_NS, connect)
                try:
                    time.sleep(IDLE_SETTLE)  # let the engine's post-work polling wind down
                    tenant_pids = netns.pids_in_netns(self.tenant_netns)
                    pids = [engine_pid, daemon_pid, *tenant_pids]
                    self.say(f"{IDLE}: measuring engine (pid {engine_pid}) and daemon (pid "
                             f"{daemon_pid}) for {IDLE_SECONDS:.0f} s; tenant idle with a "
                             "listener and one open connection")
                    pct = cpu_percent(pids, IDLE_SECONDS)
                finally:
                    held.close()
            finally:
                self.stop(server)
            res.engine, res.daemon = pct[engine_pid], pct[daemon_pid]
            res.tenant = sum(pct[p] for p in tenant_pids)
            res.percent = res.engine + res.daemon
            self.say(f"{IDLE}: {res.percent:.2f} % (engine {res.engine:.2f} %, "
                     f"daemon {res.daemon:.2f} %, tenant processes {res.tenant:.2f} %)")
        except (BenchError, OSError, KeyError, ValueError, TypeError) as e:
            res.error = str(e)
            self.say(f"{IDLE}: FAILED: {e}")
        return res

    def run_all(self) -> Report:
        results = []
        idle = None
        for m in self.opts.metrics:
            if m.name == IDLE:
                continue
            self.say(f"{m.name}: {m.what}")
            results.append(self.measure(m))
        if any(m.name == IDLE for m in self.opts.metrics):
            idle = self.m_idle()
        machine = machine_info()
        programs = sorted({p for m in self.opts.metrics for p in m.programs})
        programs += sorted({p for c in self.opts.configs for p in c.programs})
        machine["programs"] = program_versions(programs)
        settings = {"duration": self.opts.duration, "repetitions": self.opts.repetitions,
                    "quick": self.opts.quick, "wrk_connections": WRK_CONNECTIONS,
                    "configurations": {c.name: c.what for c in self.opts.configs},
                    "redis_requests": self.redis_requests, "redis_clients": REDIS_CLIENTS,
                    "idle_seconds": IDLE_SECONDS,
                    "daemon_started_by_bench": self.started_daemon,
                    "peer": f"{PEER_NS} {PEER_V4}", "native": f"{NATIVE_NS} {NATIVE_V4}",
                    "tenant": f"{TENANT} {self.tenant.addr if self.tenant else '-'}"}
        return Report(results, idle, machine, settings)


@contextmanager
def _signals_interrupt() -> Iterator[None]:
    """SIGTERM and SIGHUP unwind like Ctrl-C so that the cleanup runs."""

    def handler(signum: int, _frame: FrameType | None) -> None:
        raise Interrupted(signal.Signals(signum).name)

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


@contextmanager
def _signals_ignored() -> Iterator[None]:
    """While cleaning up, a second Ctrl-C must not leave half the fabric behind."""
    sigs = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    old = {s: signal.signal(s, signal.SIG_IGN) for s in sigs}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def run_bench(opts: Options, progress: TextIO | None = None) -> Report:
    """Set up, measure, clean up (also on Ctrl-C, SIGTERM or an error)."""
    if os.geteuid() != 0:
        raise NotRootError()
    missing = missing_programs(opts.metrics, opts.configs)
    if missing:
        raise BenchError(missing_message(missing))
    bench = Bench(opts, progress)
    interrupted: BaseException | None = None
    try:
        with _signals_interrupt():
            bench.setup()
            return bench.run_all()
    except (KeyboardInterrupt, Interrupted) as e:
        interrupted = e
        raise
    finally:
        with _signals_ignored():
            if interrupted is not None:
                bench.say("interrupted: cleaning up")
            problems = bench.cleanup()
        for p in problems:
            bench.say(f"warning: cleanup: {p}")
        if interrupted is not None:
            bench.say("cleaned up")


def main(args: Any, stdout: IO[str] | None = None) -> int:
    """The `netkernel bench` command (args from cli.build_parser())."""
    out = stdout or sys.stdout
    duration = args.duration if args.duration is not None else (
        QUICK_DURATION if args.quick else DEFAULT_DURATION)
    if duration < 1:
        raise BenchError("--duration must be at least 1 second")
    reps = args.repetitions if args.repetitions is not None else (
        1 if args.quick else DEFAULT_REPETITIONS)
    if reps < 1:
        raise BenchError("--repetitions must be at least 1")
    opts = Options(duration=duration, repetitions=reps, metrics=select_metrics(args.only),
                   quick=args.quick, configs=select_configs(args.configs), out=args.out)
    if opts.out is not None:
        check_out_dir(opts.out)
    try:
        report = run_bench(opts)
    except Interrupted as e:
        print(f"netkernel: bench interrupted by {e}", file=sys.stderr)
        return 128 + int(getattr(signal, str(e), signal.SIGTERM))
    if args.json:
        print(json.dumps(report.as_json(), indent=2), file=out)
    else:
        print(render_table(report), file=out)
    if opts.out is not None:
        for path in write_outputs(report, opts.out):
            print(f"netkernel: bench: wrote {path}", file=sys.stderr)
    errors = report.errors
    for err in errors:
        print(f"netkernel: bench: {err}", file=sys.stderr)
    if errors:
        print(f"netkernel: bench: {len(errors)} measurement(s) failed", file=sys.stderr)
        return 1
    return 0
