#!/usr/bin/env python3
"""Fair shares across hosts: tenants on two NetKernel hosts send to a third across a
bottleneck no NetKernel is told about (`netkernel lab`, the link into h3 shaped by tbf).

Tenant A on h1 opens 8 connections (iperf3 -P 8) to tenant sinka on h3, tenant B on h2 one
to sinkb. Every figure is counted at the receivers: the bytes h3's engine delivered to sinka
and sinkb, sampled every 0.5 s on h3's clock, over the window where the senders run steadily
(their first 2 s left out), never the senders' own counts:

- control: tenant_cc off on both, so Linux's per-flow sharing decides (A takes ~8/9);
- equal weights with tenant_cc on: A:B should be ~1;
- weights 2:1: A:B should be ~2;
- B alone: its share of the link (utilisation);
- A joins B, and B joins A, after JOIN s: seconds until A:B stays within 0.8-1.25; and when
  the one that joined leaves, seconds until the other has 0.9 of what B got alone again.

Usage: python3 scripts/fairness.py [--rate 300mbit] [--seconds 15] [--json FILE] [--quick]
Needs root and `pip install .`; builds and removes its own lab (fails if one is up).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from typing import Any

from netkernel.config import parse_rate

NK = [sys.executable, "-m", "netkernel"]
INTERVAL = 0.5


def nk(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(NK + list(args), capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise SystemExit(f"netkernel {' '.join(args)} failed:\n{r.stdout}{r.stderr}")
    return r


def on(host: str, *cmd: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return nk("lab", "exec", host, "--", *cmd, check=check, timeout=timeout)


def tenant_set(host: str, tenant: str, *opts: str) -> None:
    on(host, "netkernel", "tenant", "set", tenant, *opts)


# Runs on h3 (lab exec): the receiving tenants' bytes as h3's engine counts them (what it
# delivered into each tenant's rings), every TICK s, until SECONDS have passed.
POLL = """
import sys, time
from netkernel.engine import EngineClient
c = EngineClient("/run/netkernel/admin.sock")
end = time.time() + float(sys.argv[1])
while time.time() < end:
    rx = {t.name: t.rx_bytes for t in c.stats().tenants}
    print(time.time(), rx.get("sinka", 0), rx.get("sinkb", 0), flush=True)
    time.sleep(float(sys.argv[2]))
"""


def iperf(
    host: str, tenant: str, sink: str, flows: int, seconds: float, delay: float, out: dict[str, Any]
) -> None:
    time.sleep(delay)
    r = on(
        host,
        "netkernel",
        "run",
        "--tenant",
        tenant,
        "--",
        "iperf3",
        "-c",
        f"{sink}.h3.lab",
        "-P",
        str(flows),
        "-t",
        str(seconds),
        "-J",
        check=False,
        timeout=seconds + 60,
    )
    try:
        out["json"] = json.loads(r.stdout)
        out["error"] = out["json"].get("error")
    except ValueError:
        out["error"] = r.stdout[-2000:] + r.stderr[-2000:]


def run_pair(
    seconds: float, join_after: float = 0.0, b_only: bool = False, late: str = "a", stay: float = 0.0
) -> dict[str, Any]:
    """Both tenants for ``seconds``, the ``late`` one starting ``join_after`` s after the other,
    which runs on ``stay`` s after the late one has left; the receivers' byte counts every
    INTERVAL, on h3's clock: {"t": [...], "a": [...], "b": [...]} (bits/s per interval)."""
    res_a: dict[str, Any] = {}
    res_b: dict[str, Any] = {}
    total = seconds + join_after + stay
    poll: dict[str, Any] = {}

    def poller() -> None:
        poll["r"] = on("h3", sys.executable, "-c", POLL, str(total + 3), str(INTERVAL), timeout=total + 60)

    threads = [threading.Thread(target=poller)]
    a_run, a_delay = (seconds, 0.3 + join_after) if late == "a" else (total, 0.3)
    b_run, b_delay = (seconds, 0.3 + join_after) if late == "b" else (total, 0.3)
    threads.append(threading.Thread(target=iperf, args=("h2", "b", "sinkb", 1, b_run, b_delay, res_b)))
    if not b_only:
        threads.append(threading.Thread(target=iperf, args=("h1", "a", "sinka", 8, a_run, a_delay, res_a)))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for name, res in (("A", res_a), ("B", res_b)):
        if res and res.get("error"):
            raise SystemExit(f"iperf3 of tenant {name} failed: {res['error']}")
    rows = [tuple(float(x) for x in line.split()) for line in poll["r"].stdout.splitlines() if line.strip()]
    out: dict[str, Any] = {"t": [], "a": [], "b": []}
    for (t0, a0, b0), (t1, a1, b1) in zip(rows, rows[1:], strict=False):
        out["t"].append(t1 - rows[0][0])
        out["a"].append((a1 - a0) * 8 / (t1 - t0))
        out["b"].append((b1 - b0) * 8 / (t1 - t0))
    return out


def window(r: dict[str, Any], skip: float, b_only: bool = False) -> tuple[float, float]:
    """Mean bits/s of A and B over the intervals where both (or B alone) sent steadily: from
    ``skip`` s after the later one's first bytes until the first one's last full interval."""

    def span(xs: list[float]) -> tuple[int, int]:
        busy = [i for i, x in enumerate(xs) if x > 0]
        return (busy[0], busy[-1] - 1) if busy else (0, -1)  # the last busy one is the tail

    spans = [span(r["b"])] if b_only else [span(r["a"]), span(r["b"])]
    first, last = max(s[0] for s in spans), min(s[1] for s in spans)
    idx = [i for i in range(first, last + 1) if r["t"][i] >= r["t"][first] + skip]
    if not idx:
        raise SystemExit(f"no steady traffic measured: {r}")
    return sum(r["a"][i] for i in idx) / len(idx), sum(r["b"][i] for i in idx) / len(idx)


def regain(r: dict[str, Any], stays: str, left_at: float, want: float) -> float | None:
    """Seconds from the other tenant's last bytes until ``stays`` gets ``want`` bits/s (1 s
    windows)."""
    idx = [i for i, t in enumerate(r["t"]) if t > left_at]
    per = int(round(1 / INTERVAL))
    for k in range(len(idx) - per + 1):
        w = idx[k : k + per]
        if sum(r[stays][i] for i in w) / per >= want:
            return round(r["t"][w[-1]] - left_at, 2)
    return None


def convergence(r: dict[str, Any], join_at: float, lo: float, hi: float, end: float) -> float | None:
    """Seconds from A's start until A:B, on 1 s windows, enters [lo, hi] and stays there."""
    idx = [i for i, t in enumerate(r["t"]) if join_at < t <= end]
    per = int(round(1 / INTERVAL))
    ok = []
    for k in range(len(idx) - per + 1):
        w = idx[k : k + per]
        a, b = sum(r["a"][i] for i in w), sum(r["b"][i] for i in w)
        ok.append((r["t"][w[-1]], b > 0 and lo <= a / b <= hi))
    for k, (t, _) in enumerate(ok):
        if all(good for _, good in ok[k:]):
            return round(t - join_at, 2)
    return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rate", default="300mbit", help="the bottleneck (h3's link), default 300mbit")
    ap.add_argument("--queue", default="5ms", help="the bottleneck's queue, in time (default 5ms)")
    ap.add_argument("--seconds", type=float, default=15, help="each run (default 15)")
    ap.add_argument("--join", type=float, default=5, help="B runs alone this long before A joins")
    ap.add_argument("--quick", action="store_true", help="8 s runs (CI)")
    ap.add_argument(
        "--congestion-control",
        default="cubic",
        help="the NSMs' TCP congestion control (default cubic, Linux's own default)",
    )
    ap.add_argument("--json", metavar="FILE", help="also write the figures there")
    args = ap.parse_args()
    seconds = 8.0 if args.quick else args.seconds
    skip = 2.0  # the first 2 s of each run are its start-up, not its share
    link = parse_rate(args.rate)
    nk(
        "lab",
        "up",
        "--hosts",
        "3",
        "--link",
        f"h3:rate={args.rate},queue={args.queue}",
        "--congestion-control",
        args.congestion_control,
    )
    fig: dict[str, Any] = {
        "rate": args.rate,
        "seconds": seconds,
        "congestion_control": args.congestion_control,
    }
    try:
        for sink in ("sinka", "sinkb"):
            on("h3", "netkernel", "run", "--tenant", sink, "--", "iperf3", "-s", "-D")
        for host, tenant in (("h1", "a"), ("h2", "b")):
            on(host, "netkernel", "tenant", "create", tenant)
        time.sleep(1)

        def report(name: str, r: dict[str, Any]) -> None:
            a, b = window(r, skip)
            fig[name] = {
                "a_mbit": a / 1e6,
                "b_mbit": b / 1e6,
                "ratio": a / b,
                "utilisation": (a + b) / link,
                **r,
            }
            print(
                f"{name:>12}: A {a / 1e6:6.1f} Mbit/s (8 flows)  B {b / 1e6:6.1f} Mbit/s (1 flow)"
                f"  A:B {a / b:5.2f}  link {(a + b) / link:.2f}",
                flush=True,
            )

        report("control", run_pair(seconds))
        for host, tenant in (("h1", "a"), ("h2", "b")):
            tenant_set(host, tenant, "--tenant-cc", "on")
        report("equal", run_pair(seconds))
        tenant_set("h1", "a", "--weight", "2")
        report("weights_2_1", run_pair(seconds))
        tenant_set("h1", "a", "--weight", "1")
        alone = run_pair(seconds, b_only=True)
        _, b = window(alone, skip, b_only=True)
        fig["b_alone"] = {"b_mbit": b / 1e6, "utilisation": b / link, **alone}
        print(f"{'b_alone':>12}: B {b / 1e6:6.1f} Mbit/s  link {b / link:.2f}", flush=True)
        stay = 4.0
        for late in ("a", "b"):
            join = run_pair(seconds, join_after=args.join, late=late, stay=stay)
            stays = "b" if late == "a" else "a"
            first = next((t for t, x in zip(join["t"], join[late], strict=True) if x > 0), args.join)
            last = max(t for t, x in zip(join["t"], join[late], strict=True) if x > 0)
            conv = convergence(join, first, 0.8, 1.25, last - INTERVAL)
            # When the late one leaves, the other should have the link again (0.9 of what B got
            # alone).
            back = regain(join, stays, last, 0.9 * b)
            name = f"{late}_joins"
            fig[name] = {"converged_s": conv, "regained_s": back, **join}
            print(
                f"{name:>12}: A:B within 0.8-1.25 (1 s windows) "
                f"{conv if conv is not None else 'never'} s after {late.upper()} started; "
                f"{stays.upper()} back at 0.9 of the link {back if back is not None else 'never'} s "
                f"after {late.upper()} left",
                flush=True,
            )
    finally:
        nk("lab", "down", check=False)
        # Written even when a run failed part-way, so that what was measured is kept.
        if args.json:
            with open(args.json, "w") as f:
                json.dump(fig, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
