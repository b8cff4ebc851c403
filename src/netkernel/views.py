"""What the daemon shows of itself: rates sampled from the engine's stats, the replies of
status, nsm-list, ps and conns, and the snapshot the metrics endpoint serves.

These take none of the Daemon's locks, so they never wait behind a change to NSMs or tenants,
which can hold its lock for seconds (a move sleeps in it). They copy a dict's values
(``list(d.tenants.values())``) before going through them, so that a change in another thread
cannot break the iteration.
"""

from __future__ import annotations

import importlib
import logging
import os
import time
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from . import guard, netns, sandbox
from .config import BRIDGE
from .daemon_log import log, log_event
from .engine import EngineStats
from .errors import NetKernelError
from .metrics import NSMSample, Snapshot, TenantSample
from .records import NSM

if TYPE_CHECKING:
    from .daemon import Daemon

SAMPLE_INTERVAL = 1.0  # engine stats for rates


def abi_version() -> int | None:
    """The shared-memory ABI version GuestLib and the engine were built with (generated from
    include/netkernel/abi.h at build time; absent in a source tree that was never built)."""
    try:
        abi = importlib.import_module("netkernel._abi")
    except ImportError:
        return None
    return int(abi.NK_ABI_VERSION)


# -- rates --------------------------------------------------------------------------------------


def _rate(
    samples: dict[str, tuple[float, int, int]], name: str, now: float, tx: int, rx: int
) -> tuple[float, float] | None:
    prev = samples.get(name)
    samples[name] = (now, tx, rx)
    if prev is None or now <= prev[0]:
        return None
    dt = now - prev[0]
    # Counters start again at 0 when a tenant is re-created under the same name.
    return max(0.0, (tx - prev[1]) * 8 / dt), max(0.0, (rx - prev[2]) * 8 / dt)


class Rates:
    """Bit rates per tenant and per NSM from two successive samples of the engine's stats,
    and a log event when a tenant's limits refused sockets since the previous sample."""

    def __init__(self) -> None:
        # The previous sample (time, tx, rx) and the latest rates (bit/s) per name.
        self._samples: dict[str, tuple[float, int, int]] = {}
        self.tenants: dict[str, tuple[float, float]] = {}
        self._nsm_samples: dict[str, tuple[float, int, int]] = {}
        self.nsms: dict[str, tuple[float, float]] = {}
        self._refused: dict[str, tuple[int, int]] = {}

    def record(self, stats: EngineStats, now: float) -> None:
        for s in stats.tenants:
            rate = _rate(self._samples, s.name, now, s.tx_bytes, s.rx_bytes)
            if rate is not None:
                self.tenants[s.name] = rate
            refused = (s.refused_sockets, s.refused_memory)
            before = self._refused.get(s.name, refused)
            self._refused[s.name] = refused
            for reason, count, prev, limit in (
                ("max_sockets", refused[0], before[0], s.max_sockets),
                ("max_memory", refused[1], before[1], s.max_memory),
            ):
                if count > prev:
                    log_event(
                        "sockets_refused",
                        logging.WARNING,
                        tenant=s.name,
                        nsm=s.nsm,
                        reason=reason,
                        limit=limit,
                        count=count - prev,
                    )
        for n in stats.nsms:
            rate = _rate(self._nsm_samples, n.name, now, n.tx_bytes, n.rx_bytes)
            if rate is not None:
                self.nsms[n.name] = rate

    def forget(self, tenant: str) -> None:
        """A deleted tenant's: one re-created under its name starts afresh."""
        self._samples.pop(tenant, None)
        self.tenants.pop(tenant, None)
        self._refused.pop(tenant, None)


def sample_loop(d: Daemon) -> None:
    while not d.stop_event.wait(SAMPLE_INTERVAL):
        try:
            stats = d.engine_client.stats()
        except NetKernelError as e:
            log.debug("stats sample failed: %s", e)
            continue
        d.rates.record(stats, time.monotonic())


# -- API replies --------------------------------------------------------------------------------


def _nsm_summary(d: Daemon, nsm: NSM) -> dict[str, Any]:
    c = d.config
    # An external NSM's namespace holds no address of its own: its stack holds the tenants'.
    return {
        "name": nsm.name,
        "kind": nsm.config.kind,
        "netns": nsm.netns,
        "ipv4": None if nsm.external else str(c.nsm_ipv4(nsm.index)),
        "ipv6": None if nsm.external else str(c.nsm_ipv6(nsm.index)),
        "congestion_control": nsm.config.congestion_control,
        "bandwidth": nsm.config.bandwidth,
        "tenants": sum(1 for t in list(d.tenants.values()) if t.nsm == nsm.name),
    }


def status(d: Daemon) -> dict[str, Any]:
    return {
        "running": True,
        "pid": os.getpid(),
        "engine_pid": d.engine.pid if d.engine and d.engine.poll() is None else None,
        # Restarts after the engine died (supervise.py), and why none runs when none does.
        "engine_restarts": d.engine_restarts,
        "engine_failed": d.engine_failed,
        "uptime": round(time.time() - d.started, 1),
        "nsms": [_nsm_summary(d, n) for n in list(d.nsms.values())],
        "tenants": len(d.tenants),
        "api_socket": str(d.config.api_socket),
        "metrics": f"http://{d.metrics.address}/metrics" if d.metrics else None,
        "abi_version": abi_version(),
        # What the host's descriptor limits allow the engine (supervise.raise_fd_limit).
        "connections": {
            "fd_limit": d.fd_limit.limit,
            "max": d.fd_limit.connections,
            "limit_raised": d.fd_limit.raised,
            "summary": d.fd_limit.describe(),
        }
        if d.fd_limit
        else None,
        # How tenants are held (threat-model.md): controllers their cgroups have, and
        # the ones this host lacks (their limits are then not enforced).
        "sandbox": {
            "cgroups": {c: ("v2" if p.v2 else "v1") for c, p in d.cgroups.places.items()},
            "cgroups_missing": d.cgroups.missing(),
            "firewall": f"nft inet {guard.table_name(BRIDGE)}",
        },
    }


def nsm_list(d: Daemon) -> list[dict[str, Any]]:
    stats = d.engine_stats()
    tenants = list(d.tenants.values())
    out = []
    for nsm in list(d.nsms.values()):
        s = stats.nsm(nsm.name) if stats else None
        rates = d.rates.nsms.get(nsm.name)
        out.append(
            {
                **_nsm_summary(d, nsm),
                # What the namespace really runs, not only what was asked.
                "congestion_control": None
                if nsm.external
                else netns.sysctl_get("net.ipv4.tcp_congestion_control", nsm.netns),
                "sysctl": dict(nsm.config.sysctls),
                "tenants": sorted(t.name for t in tenants if t.nsm == nsm.name),
                "draining": sorted(t.name for t in tenants if nsm.name in t.draining),
                "sockets": s.sockets if s else None,
                "tx_bytes": s.tx_bytes if s else None,
                "rx_bytes": s.rx_bytes if s else None,
                "tx_bps": round(rates[0]) if rates else None,
                "rx_bps": round(rates[1]) if rates else None,
                # An external NSM: its process (restarted by the daemon when it dies).
                "pid": d.nsm_procs[nsm.name].pid if nsm.name in d.nsm_procs else None,
                "up": bool(s.up) if s else None,
                "restarts": max(s.connects - 1, 0) if s and nsm.external else 0,
            }
        )
    return out


def ps(d: Daemon) -> list[dict[str, Any]]:
    stats = d.engine_stats()
    out = []
    for t in sorted(list(d.tenants.values()), key=lambda t: t.name):
        s = stats.tenant(t.name) if stats else None
        rates = d.rates.tenants.get(t.name)
        out.append(
            {
                "name": t.name,
                "nsm": t.nsm,
                "id": t.id,
                "ipv4": t.ipv4,
                "ipv6": t.ipv6,
                "netns": t.netns,
                "pids": sandbox.programs(t.name, netns.pids_in_netns(t.netns)),
                "uid_base": t.uid_base,
                "uid_count": sandbox.TENANT_UID_COUNT,
                "sockets": s.sockets if s else None,
                "memory": s.memory if s else None,
                "tx_bytes": s.tx_bytes if s else None,
                "rx_bytes": s.rx_bytes if s else None,
                "tx_bps": round(rates[0]) if rates else None,
                "rx_bps": round(rates[1]) if rates else None,
                "refused_sockets": s.refused_sockets if s else None,
                "refused_memory": s.refused_memory if s else None,
                "engine_seconds": s.engine_ns / 1e9 if s else None,
                "engine_skips": s.engine_skips if s else None,
                "fds": s.fds if s else None,
                "fd_limit": s.fd_limit if s else None,
                "dns_relayed": s.dns_relayed if s else None,
                "dns_dropped": s.dns_dropped if s else None,
                "region_bytes": s.region_bytes if s else None,
                "rings_shrunk": s.rings_shrunk if s else None,
                "throttle_wakes": s.throttle_wakes if s else None,
                "throttle_late_seconds": s.throttle_late_ns / 1e9 if s else None,
                "rate_late_credit_bytes": s.rate_late_credit if s else None,
                # Tenant-level congestion control: the rate it may send now (0: not limited,
                # no congestion seen), and the congestion its connections see.
                "cc_rate_bps": s.cc_rate if s else None,
                "cc_delivered_bps": s.cc_sent if s else None,
                "cc_queue_delay_seconds": s.cc_qdelay_us / 1e6 if s else None,
                "cc_retransmits": s.cc_retrans if s else None,
                "cc_cuts": s.cc_cuts if s else None,
                "policy": asdict(t.policy),
                "draining": list(t.draining),
            }
        )
    return out


def conns(d: Daemon, tenant: str | None) -> list[dict[str, Any]]:
    if tenant is not None:
        d.get_tenant(tenant)
    return [asdict(c) for c in d.engine_client.conns(tenant) if tenant is None or c.tenant == tenant]


def metrics_snapshot(d: Daemon) -> Snapshot:
    try:
        stats: EngineStats | None = d.engine_client.stats()
    except NetKernelError:
        stats = None
    tenants = list(d.tenants.values())
    return Snapshot(
        up=stats is not None,
        tenants=tuple(
            TenantSample(t.name, t.nsm, t.policy, stats.tenant(t.name) if stats else None) for t in tenants
        ),
        nsms=tuple(
            NSMSample(
                n.name, sum(1 for t in tenants if t.nsm == n.name), stats.nsm(n.name) if stats else None
            )
            for n in list(d.nsms.values())
        ),
    )
