"""What the bench measures: the configurations, the metrics with their floors, and the
options of one run."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import NetKernelError

DEFAULT_DURATION = 10
QUICK_DURATION = 3
DEFAULT_REPETITIONS = 3
IDLE_SECONDS = 5.0

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
    Configuration(
        "netkernel", "a NetKernel tenant: GuestLib, shared-memory rings, the engine, the kernel NSM"
    ),
    Configuration(
        "pasta",
        "pasta (passt) serving the sandbox's tap, MTU 65520, its sockets in nkb-pasta-h",
        ("pasta",),
        65520,
        "nkb-pasta",
        "nkb-pasta-h",
        "198.19.251.2",
        "fd6e:6b00::ff:f2",
    ),
    Configuration(
        "slirp4netns",
        "slirp4netns, MTU 65520, its sockets in nkb-slirp-h",
        ("slirp4netns",),
        65520,
        "nkb-slirp",
        "nkb-slirp-h",
        "198.19.251.3",
        "fd6e:6b00::ff:f3",
    ),
    Configuration(
        "slirp4netns-1500",
        "slirp4netns, MTU 1500, its sockets in nkb-slirp15-h",
        ("slirp4netns",),
        1500,
        "nkb-slirp15",
        "nkb-slirp15-h",
        "198.19.251.4",
        "fd6e:6b00::ff:f4",
    ),
    Configuration(
        "netkernel-static",
        "the NetKernel tenant, its programs run without GuestLib, as a static or Go program "
        "runs: their kernel sockets carried through NetKernel by the tenant's relay",
    ),
    Configuration(
        "netkernel-lwip",
        "a NetKernel tenant on the lwIP NSM (netkernel-lwip: lwIP "
        "in a process of its own, on a TAP device), the same programs unmodified",
    ),
)
CONFIG_NAMES = tuple(c.name for c in CONFIGS)
# What NetKernel is compared with beyond native: the single-stream and latency floors.
PEERS = ("pasta", "slirp4netns", "slirp4netns-1500")
LWIP = "netkernel-lwip"
STATIC = "netkernel-static"
# Measured beside native and netkernel when chosen (all by default).
OTHERS = (*PEERS, STATIC, LWIP)


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
    Metric(
        "iperf3_tcp_gbps",
        "Gbit/s",
        ("iperf3",),
        Floor(">=", 0.7),
        "iperf3 TCP throughput, one stream, client on the measured side",
    ),
    Metric(
        "iperf3_tcp_p4_gbps",
        "Gbit/s",
        ("iperf3",),
        None,
        "iperf3 TCP throughput, 4 streams, client on the measured side sends",
    ),
    Metric(
        "iperf3_tcp_rx_gbps",
        "Gbit/s",
        ("iperf3",),
        None,
        "iperf3 TCP throughput, one stream, the measured side receives (-R)",
    ),
    Metric(
        "iperf3_tcp_rx_p4_gbps",
        "Gbit/s",
        ("iperf3",),
        None,
        "iperf3 TCP throughput, 4 streams, the measured side receives (-R)",
    ),
    Metric(
        "tcp_rr_p50_us",
        "us",
        ("sockperf",),
        Floor("<=", 1.6),
        "sockperf TCP ping-pong p50 latency, 64-byte messages",
    ),
    Metric(
        "tcp_crr_rps",
        "req/s",
        (),
        None,
        "connection rate: connect, 64-byte request and answer, close; 8 threads "
        "(netkernel-crr client on the measured side, server in the peer)",
    ),
    Metric(
        "nginx_keepalive_rps",
        "req/s",
        ("nginx", "wrk"),
        Floor(">=", 0.7),
        "nginx 1 KiB file, wrk keep-alive, 32 connections",
    ),
    Metric(
        "nginx_close_rps",
        "req/s",
        ("nginx", "wrk"),
        Floor(">=", 0.5),
        "nginx 1 KiB file, wrk with Connection: close, 32 connections",
    ),
    Metric(
        "nginx_1m_keepalive_rps",
        "req/s",
        ("nginx", "wrk"),
        None,
        "nginx 1 MiB file, wrk keep-alive, 32 connections",
    ),
    Metric(
        "nginx_1m_close_rps",
        "req/s",
        ("nginx", "wrk"),
        None,
        "nginx 1 MiB file, wrk with Connection: close, 32 connections",
    ),
    Metric(
        "go_http_rps",
        "req/s",
        ("go", "wrk"),
        Floor(">=", 0.7),
        "a Go net/http server (static, CGO_ENABLED=0: in a tenant through its relay) "
        "serving 1 KiB, wrk keep-alive, 32 connections",
    ),
    Metric(
        "redis_get_rps",
        "req/s",
        ("redis-server", "redis-benchmark"),
        Floor(">=", 0.7),
        "redis-server GET, redis-benchmark 32 clients",
    ),
    Metric(
        "redis_get_5k_rps",
        "req/s",
        ("redis-server", "redis-benchmark"),
        None,
        "redis-server GET, redis-benchmark 5,000 clients (each a connection held open)",
        configs=SIDES,
    ),
    Metric(
        "redis_set_rps",
        "req/s",
        ("redis-server", "redis-benchmark"),
        None,
        "redis-server SET, redis-benchmark 32 clients",
    ),
    *(
        Metric(
            f"mux{n}_gbps",
            "Gbit/s",
            ("iperf3",),
            None,
            f"aggregate iperf3 throughput of {n} sandbox(es) at once, one stream each: "
            f"{n} tenant(s) on one engine thread vs {n} native namespace(s)",
            configs=SIDES,
        )
        for n in (1, 4, 16)
    ),
    Metric(
        "noisy_neighbour_kept",
        "kept",
        ("sockperf",),
        Floor(">=", 0.8, of="netkernel"),
        "share of a quiet sockperf ping-pong's rate kept beside a noisy neighbour "
        "(200 connections, 16-byte writes)",
        configs=SIDES,
    ),
    # Colocated: client and server on one host. native = both in one namespace over loopback
    # TCP; netkernel = client in one tenant, server in another, over the shared-memory path.
    Metric(
        "colo_iperf3_gbps",
        "Gbit/s",
        ("iperf3",),
        Floor(">=", 1.5),
        "colocated iperf3, one stream: tenant to tenant over shared memory vs loopback TCP in one namespace",
        configs=SIDES,
    ),
    Metric(
        "colo_tcp_rr_p50_us",
        "us",
        ("sockperf",),
        Floor("<=", 0.8),
        "colocated sockperf ping-pong p50, 64-byte messages: tenant to tenant vs loopback",
        configs=SIDES,
    ),
    Metric(
        "colo_nginx_keepalive_rps",
        "req/s",
        ("nginx", "wrk"),
        Floor(">=", 1.0),
        "colocated nginx 1 KiB, wrk keep-alive, 32 connections: tenant to tenant vs loopback",
        configs=SIDES,
    ),
    Metric(
        "colo_tcp_crr_rps",
        "req/s",
        (),
        None,
        "colocated connection rate (connect, 64-byte request and answer, close; 8 threads): "
        "tenant to tenant vs loopback",
        configs=SIDES,
    ),
    Metric(
        "colo_redis_get_rps",
        "req/s",
        ("redis-server", "redis-benchmark"),
        None,
        "colocated redis-server GET, redis-benchmark 32 clients: tenant to tenant vs loopback",
        configs=SIDES,
    ),
    # Connections held (issue 16): an epoll server on the measured side holds HELD idle
    # connections from a client in the peer. One run gives all four figures.
    Metric(
        "held_connections",
        "conns",
        (),
        Floor(">=", 1.0),
        "concurrent TCP connections an epoll server on the measured side holds from a client "
        "in the peer (each speaks as it opens and again once all are open; then all close)",
        configs=SIDES,
    ),
    Metric(
        "held_open_seconds",
        "s",
        (),
        None,
        "time to open the held connections and have each answered once (256 connects in flight)",
        configs=SIDES,
    ),
    Metric(
        "held_memory_kib",
        "KiB/conn",
        (),
        Floor("<=", 32.0, of="netkernel"),
        "memory per idle held connection: native, the kernel's slab growth per socket; "
        "netkernel, NetKernel's own (all the tenant region holds + engine private memory growth)",
        configs=SIDES,
    ),
    Metric(
        "held_idle_cpu_percent",
        "%",
        (),
        Floor("<", 0.5, of="netkernel"),
        "engine + daemon CPU over 5 s while the connections are held and idle, percent of one "
        "core (the machine's, natively too, is in the JSON: machine_idle_cpu_percent)",
        configs=("netkernel",),
    ),
    Metric(
        "idle_cpu_percent",
        "%",
        (),
        IDLE_FLOOR,
        "engine + daemon CPU over 5 s with the tenant idle, percent of one core",
        configs=("netkernel",),
    ),
)
METRIC_NAMES = tuple(m.name for m in METRICS)
IDLE = "idle_cpu_percent"


class BenchError(NetKernelError):
    """A program is missing, the setup failed or a measurement could not be taken."""


def select_metrics(only: str | None) -> list[Metric]:
    if not only:
        return list(METRICS)
    wanted = [w.strip() for w in only.split(",") if w.strip()]
    unknown = [w for w in wanted if w not in METRIC_NAMES]
    if unknown or not wanted:
        raise BenchError(
            f"--only: unknown metric {', '.join(unknown) or '(none)'} (known: {', '.join(METRIC_NAMES)})"
        )
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
        raise BenchError(
            f"--configs: unknown configuration {', '.join(unknown) or '(none)'} "
            f"(known: {', '.join(OTHERS)}; native and netkernel are always measured; "
            "'none' for no others)"
        )
    return [c for c in CONFIGS if c.name in SIDES or c.name in wanted]


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
