"""The daemon's Prometheus endpoint.

A custom collector asks the daemon for a fresh snapshot (the engine's counters plus the
daemon's tenant records) on every scrape, so nothing is cached and a scrape never sees
numbers older than the request. Metric names are documented in docs/operations.md.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

from prometheus_client import start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from .config import Policy
from .engine import NSMStats, TenantStats
from .errors import NetKernelError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TenantSample:
    name: str
    nsm: str
    policy: Policy
    stats: TenantStats | None  # None: the engine did not report this tenant


@dataclass(frozen=True)
class NSMSample:
    name: str
    tenants: int
    stats: NSMStats | None


@dataclass(frozen=True)
class Snapshot:
    up: bool  # the engine answered
    tenants: tuple[TenantSample, ...]
    nsms: tuple[NSMSample, ...]


class NetKernelCollector(Collector):
    def __init__(self, snapshot: Callable[[], Snapshot]) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        snap = self.snapshot()
        up = GaugeMetricFamily("netkernel_up", "1 if the engine answered this scrape, else 0")
        up.add_metric([], 1.0 if snap.up else 0.0)
        yield up

        labels = ["tenant", "nsm"]
        tx = CounterMetricFamily("netkernel_tenant_tx_bytes", "Bytes the tenant sent", labels=labels)
        rx = CounterMetricFamily("netkernel_tenant_rx_bytes", "Bytes the tenant received", labels=labels)
        refused = CounterMetricFamily(
            "netkernel_tenant_sockets_refused",
            "Sockets refused to the tenant by its max_sockets or max_memory limit",
            labels=labels,
        )
        sockets = GaugeMetricFamily("netkernel_tenant_sockets", "Open sockets", labels=labels)
        memory = GaugeMetricFamily(
            "netkernel_tenant_memory_bytes", "Shared memory committed to the tenant's rings", labels=labels
        )
        limit_tx = GaugeMetricFamily(
            "netkernel_tenant_rate_limit_tx_bps", "Egress rate limit in bits/s (0 = unlimited)", labels=labels
        )
        limit_rx = GaugeMetricFamily(
            "netkernel_tenant_rate_limit_rx_bps",
            "Ingress rate limit in bits/s (0 = unlimited)",
            labels=labels,
        )
        weight = GaugeMetricFamily(
            "netkernel_tenant_weight", "Share of a bottleneck relative to other tenants", labels=labels
        )
        engine = CounterMetricFamily(
            "netkernel_tenant_engine_seconds", "Engine time spent serving the tenant's sockets", labels=labels
        )
        skips = CounterMetricFamily(
            "netkernel_tenant_engine_skips",
            "Engine rounds the tenant sat out for being over its share of engine time",
            labels=labels,
        )
        cc_rate = GaugeMetricFamily(
            "netkernel_tenant_cc_allowed_bps",
            "Tenant-level congestion control: the egress rate it allows the tenant now, in bits/s "
            "(0 = not limited: no congestion seen, or tenant_cc off)",
            labels=labels,
        )
        cc_qdelay = GaugeMetricFamily(
            "netkernel_tenant_cc_queue_delay_seconds",
            "Queueing delay the tenant's sending connections see (smoothed RTT above their minimum)",
            labels=labels,
        )
        cc_retrans = CounterMetricFamily(
            "netkernel_tenant_cc_retransmits",
            "Segments the tenant's connections retransmitted",
            labels=labels,
        )
        cc_cuts = CounterMetricFamily(
            "netkernel_tenant_cc_cuts", "Times congestion cut the tenant's allowed rate", labels=labels
        )
        for t in snap.tenants:
            values = [t.name, t.nsm]
            s = t.stats
            # A tenant the engine did not report has no counters, never fake zeros.
            if s is not None:
                tx.add_metric(values, float(s.tx_bytes))
                rx.add_metric(values, float(s.rx_bytes))
                refused.add_metric(values, float(s.refused_sockets + s.refused_memory))
                sockets.add_metric(values, float(s.sockets))
                memory.add_metric(values, float(s.memory))
                engine.add_metric(values, s.engine_ns / 1e9)
                skips.add_metric(values, float(s.engine_skips))
                cc_rate.add_metric(values, float(s.cc_rate))
                cc_qdelay.add_metric(values, s.cc_qdelay_us / 1e6)
                cc_retrans.add_metric(values, float(s.cc_retrans))
                cc_cuts.add_metric(values, float(s.cc_cuts))
            # The engine's view when it reports one, else the policy the daemon gave it.
            limit_tx.add_metric(values, float(s.rate_tx if s else t.policy.rate_tx))
            limit_rx.add_metric(values, float(s.rate_rx if s else t.policy.rate_rx))
            weight.add_metric(values, float(s.weight if s else t.policy.weight))
        yield from (tx, rx, refused, sockets, memory, engine, skips, limit_tx, limit_rx, weight)
        yield from (cc_rate, cc_qdelay, cc_retrans, cc_cuts)

        nsm_tx = CounterMetricFamily("netkernel_nsm_tx_bytes", "Bytes sent through the NSM", labels=["nsm"])
        nsm_rx = CounterMetricFamily(
            "netkernel_nsm_rx_bytes", "Bytes received through the NSM", labels=["nsm"]
        )
        nsm_sockets = GaugeMetricFamily("netkernel_nsm_sockets", "Open sockets in the NSM", labels=["nsm"])
        nsm_tenants = GaugeMetricFamily(
            "netkernel_nsm_tenants", "Tenants assigned to the NSM", labels=["nsm"]
        )
        for n in snap.nsms:
            if n.stats is not None:
                nsm_tx.add_metric([n.name], float(n.stats.tx_bytes))
                nsm_rx.add_metric([n.name], float(n.stats.rx_bytes))
                nsm_sockets.add_metric([n.name], float(n.stats.sockets))
            nsm_tenants.add_metric([n.name], float(n.tenants))
        yield from (nsm_tx, nsm_rx, nsm_sockets, nsm_tenants)


class MetricsServer:
    """The HTTP endpoint on ``host:port``; start() raises NetKernelError if it cannot bind."""

    def __init__(self, host: str, port: int, snapshot: Callable[[], Snapshot]) -> None:
        self.host = host
        self.port = port
        # A registry of our own: nothing but NetKernel's metrics, and describe() is not
        # called at registration (it would query the engine before it runs).
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(NetKernelCollector(snapshot))
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        try:
            self._server, self._thread = start_http_server(self.port, self.host, self.registry)
        except OSError as e:
            raise NetKernelError(
                f"metrics endpoint {self.address}: cannot listen: {e.strerror or e} "
                '(change [daemon] metrics_listen, or "" to disable it)'
            ) from None
        self.port = self._server.server_port  # the one the kernel chose, if asked for port 0
        log.info("metrics: http://%s/metrics", self.address)

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
