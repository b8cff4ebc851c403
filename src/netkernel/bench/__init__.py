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

The package: catalogue (what is measured), parse (the programs' output), probes (the host),
places (namespaces, tenants and processes), workloads (the measurements), report (the
results) and command (`netkernel bench` itself); programs/ holds the programs and the nginx
configuration the workloads run.
"""

from __future__ import annotations

from .catalogue import (
    CONFIG_NAMES,
    CONFIGS,
    DEFAULT_DURATION,
    DEFAULT_REPETITIONS,
    IDLE,
    METRIC_NAMES,
    METRICS,
    OTHERS,
    PEERS,
    QUICK_DURATION,
    SIDES,
    BenchError,
    Configuration,
    Floor,
    Metric,
    Options,
    select_configs,
    select_metrics,
)
from .command import main, run_bench
from .parse import (
    ParseError,
    WrkResult,
    median,
    parse_iperf3,
    parse_redis_benchmark,
    parse_sockperf,
    parse_wrk,
    ratio,
)
from .places import LWIP_NSM, LWIP_TENANT, Place, program
from .probes import (
    cpu_percent,
    lowest_priority,
    lowest_tenant_priority,
    machine_idle_seconds,
    machine_info,
    missing_programs,
    program_versions,
)
from .report import (
    IdleResult,
    MetricResult,
    Report,
    peer_floors,
    render_markdown,
    render_table,
    write_outputs,
)
from .workloads import Bench

__all__ = [
    "CONFIGS",
    "CONFIG_NAMES",
    "DEFAULT_DURATION",
    "DEFAULT_REPETITIONS",
    "IDLE",
    "LWIP_NSM",
    "LWIP_TENANT",
    "METRICS",
    "METRIC_NAMES",
    "OTHERS",
    "PEERS",
    "QUICK_DURATION",
    "SIDES",
    "Bench",
    "BenchError",
    "Configuration",
    "Floor",
    "IdleResult",
    "Metric",
    "MetricResult",
    "Options",
    "ParseError",
    "Place",
    "Report",
    "WrkResult",
    "cpu_percent",
    "lowest_priority",
    "lowest_tenant_priority",
    "machine_idle_seconds",
    "machine_info",
    "main",
    "median",
    "missing_programs",
    "parse_iperf3",
    "parse_redis_benchmark",
    "parse_sockperf",
    "parse_wrk",
    "peer_floors",
    "program",
    "program_versions",
    "ratio",
    "render_markdown",
    "render_table",
    "run_bench",
    "select_configs",
    "select_metrics",
    "write_outputs",
]
