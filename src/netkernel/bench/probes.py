"""What the bench asks of the host: the programs it needs, CPU time, the machine and
program versions for the report, and CPU priorities."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .. import __version__, cgroups, netns
from ..config import PID_FILE, libdir
from .catalogue import Configuration, Metric
from .parse import strip_ansi

# Debian 12 package of each program the bench runs.
PACKAGES = {
    "iperf3": "iperf3",
    "sockperf": "sockperf",
    "nginx": "nginx",
    "wrk": "wrk",
    "go": "golang-go",
    "redis-server": "redis-server",
    "redis-benchmark": "redis-tools",
    "pasta": "passt",
    "slirp4netns": "slirp4netns",
    "ip": "iproute2",
    "ss": "iproute2",
}


def missing_programs(metrics: Sequence[Metric], configs: Sequence[Configuration] = ()) -> list[str]:
    needed = ["ip", "ss"]
    for m in metrics:
        needed += [p for p in m.programs if p not in needed]
    for c in configs:
        needed += [p for p in c.programs if p not in needed]
    return [p for p in needed if shutil.which(p) is None]


def missing_message(missing: Sequence[str]) -> str:
    pkgs = sorted({PACKAGES.get(p, p) for p in missing})
    return (
        f"bench needs {', '.join(missing)}, not found in PATH; install with: apt-get install {' '.join(pkgs)}"
    )


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


def cpu_percent(
    pids: Sequence[int], seconds: float, sleep: Callable[[float], None] = time.sleep
) -> dict[int, float]:
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


def kernel_slab_bytes() -> int:
    """The kernel's slab memory (Slab in /proc/meminfo): where its sockets, their files and
    their timers live. An idle TCP connection costs the kernel nothing else."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("Slab:"):
            return int(line.split()[1]) * 1024
    raise OSError("no Slab line in /proc/meminfo")


def private_bytes(pid: int) -> int:
    """A process's private resident memory (RssAnon); shared memory it maps is not counted."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    raise OSError(f"no RssAnon in /proc/{pid}/status")


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
        info["tcp_congestion_control"] = Path("/proc/sys/net/ipv4/tcp_congestion_control").read_text().strip()
    except OSError:
        pass
    return info


def program_versions(programs: Sequence[str]) -> dict[str, str]:
    probes = {
        "iperf3": ["iperf3", "--version"],
        "sockperf": ["sockperf", "--version"],
        "nginx": ["nginx", "-v"],
        "wrk": ["wrk", "-v"],
        "go": ["go", "version"],
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
            out[p] = strip_ansi(lines[0]).strip()
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
