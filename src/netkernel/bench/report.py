"""The results: per metric and configuration the samples, their medians and ratios, the
floors; as a table, Markdown, JSON and charts."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .catalogue import (
    CONFIG_NAMES,
    IDLE,
    IDLE_FLOOR,
    IDLE_SECONDS,
    OTHERS,
    PEERS,
    SIDES,
    BenchError,
    Floor,
    Metric,
)
from .parse import median, ratio


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
            out[c] = {
                "value": median(xs),
                "min": min(xs),
                "max": max(xs),
                "samples": xs,
                "ratio_to_native": ratio(self.native, median(xs)),
                "cpu_cores": self.extra.get(f"{c}_cpu_cores"),
                "cpu_per_unit": self.cpu_per_unit(c),
            }
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
            "percent": self.percent,
            "engine_percent": self.engine,
            "daemon_percent": self.daemon,
            "tenant_processes_percent": self.tenant,
            "seconds": self.seconds,
            "floor": floor.as_json(),
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
        return [
            f"{r.metric.name} {c}: {len(errs)} run(s) failed: {errs[0].splitlines()[0]}"
            for r in self.results
            for c, errs in r.peer_errors.items()
        ]

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
                entries.append({"metric": r.metric.name, "configuration": c, "unit": r.metric.unit, **d})
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
            out.append(
                {
                    "metric": r.metric.name,
                    "peer": peer,
                    "netkernel_over_peer": x,
                    "floor": f"netkernel / {peer} {want[0]} {want[1]:g}",
                    "met": Floor(want[0], want[1]).met(x),
                }
            )
    for r in results:
        if r.metric.name != "mux16_gbps":
            continue
        # 16 tenants on one engine against 16 namespaces: CPU for the same throughput.
        x = ratio(r.cpu_per_unit("native"), r.cpu_per_unit("netkernel"))
        if x is not None:
            out.append(
                {
                    "metric": r.metric.name,
                    "peer": "native",
                    "netkernel_over_peer": x,
                    "floor": "CPU per Gbit/s, 16 tenants / 16 native namespaces <= 1",
                    "met": Floor("<=", 1.0).met(x),
                }
            )
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
        rows.append(
            [
                m.name,
                m.unit,
                _fmt(r.native, m.unit),
                _fmt(r.netkernel, m.unit),
                "-" if rt is None else f"{rt:.2f}",
                str(m.floor or "-"),
                verdict(r.meets_floor, r.error),
            ]
            + [
                "FAILED" if not r.samples.get(c) and c in r.peer_errors else _fmt(r.value(c), m.unit)
                for c in others
            ]
        )
    if report.idle is not None:
        floor = IDLE_FLOOR
        rows.append(
            [
                IDLE,
                "%",
                "-",
                _fmt(report.idle.percent, "%"),
                "-",
                str(floor),
                verdict(floor.met(report.idle.percent), report.idle.error),
            ]
            + ["-" for _ in others]
        )
    cells = [headers] + rows
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = []
    for row in cells:
        parts = [
            c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(parts).rstrip())
    lines.insert(1, "  ".join("-" * w for w in widths))
    s = report.settings
    notes = [
        f"median of {s['repetitions']} run(s) per configuration, {s['duration']} s each, "
        "configurations interleaved; ratio = netkernel / native"
    ]
    notes += [f"failed run (not counted): {e}" for e in report.peer_failures]
    for f in peer_floors(report.results):
        notes.append(f"{f['floor']}: {f['netkernel_over_peer']:.2f} ({'met' if f['met'] else 'NOT met'})")
    for r in report.results:
        for side in CONFIG_NAMES:
            errs = r.extra.get(f"{side}_socket_errors")
            # native and NetKernel always (0 is the figure to check); the others when not 0.
            if errs is not None and (side in SIDES or sum(errs.values())):
                total = sum(errs.values())
                bad = r.extra.get(f"{side}_non_2xx_3xx", 0)
                detail = ", ".join(f"{k} {v}" for k, v in errs.items())
                notes.append(
                    f"{r.metric.name} {side}: socket errors {total}"
                    + (f" ({detail})" if total else "")
                    + (f", non-2xx/3xx responses {bad}" if bad else "")
                )
    engine = [
        f"{r.metric.name} {r.extra['netkernel_engine_cpu_percent']:.0f} %"
        for r in report.results
        if r.extra.get("netkernel_engine_cpu_percent") is not None
    ]
    if engine:
        notes.append("engine CPU during the NetKernel runs (of one core): " + ", ".join(engine))
    if report.idle is not None and report.idle.percent is not None:
        i = report.idle
        notes.append(
            f"idle: engine {i.engine:.2f} % + daemon {i.daemon:.2f} % of one core over "
            f"{i.seconds:.0f} s (tenant processes: {i.tenant:.2f} %)"
        )
    return "\n".join(lines + [""] + notes)


def render_markdown(report: Report) -> str:
    """The full table: per metric and configuration the median with min-max, the ratio to
    native, and the CPU it took (machine-wide, load generator included)."""
    configs = [c for c in CONFIG_NAMES if any(r.samples.get(c) or c in r.peer_errors for r in report.results)]
    s = report.settings
    out = [
        "# netkernel bench",
        "",
        f"Median of {s.get('repetitions')} run(s) of {s.get('duration')} s per configuration "
        "(min–max in brackets), configurations interleaved; ×N is the ratio to native.",
        "",
    ]
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
        out.append(f"| {m.name} | {m.unit} | " + " | ".join(cells) + f" | {m.floor or '–'}{verdict} |")
    if report.idle is not None and report.idle.percent is not None:
        out += ["", f"Idle: engine + daemon {report.idle.percent:.2f} % of one core (floor {IDLE_FLOOR})."]
    cpu_rows = [r for r in report.results if any(r.cpu_per_unit(c) is not None for c in configs)]
    if cpu_rows:
        out += [
            "",
            "## CPU",
            "",
            "Busy cores of the whole machine during each run (/proc/stat: the configuration, "
            "its helpers and the load generator in the peer, which is the same for all) per "
            "Gbit/s, or core-seconds per 1000 requests. Lower is better.",
            "",
            "| metric | per | " + " | ".join(configs) + " |",
            "|---|---|" + "---:|" * len(configs),
        ]
        for r in cpu_rows:
            per = "Gbit/s" if r.metric.unit == "Gbit/s" else "1k req"
            vals = [r.cpu_per_unit(c) for c in configs]
            out.append(
                f"| {r.metric.name} | {per} | "
                + " | ".join("–" if v is None else f"{v:.3f}" for v in vals)
                + " |"
            )
    floors = peer_floors(report.results)
    if floors:
        out += ["", "## NetKernel against the user-mode stacks", ""]
        out += [
            f"- {f['floor']}: {f['netkernel_over_peer']:.2f} — {'met' if f['met'] else 'NOT met'}"
            for f in floors
        ]
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
        raise BenchError(
            "--out writes PNG charts with matplotlib, which is not installed; "
            "install it with: pip install matplotlib (or pip install "
            "'netkernel[bench]')"
        ) from None
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
        colors = ["#777777" if c == "native" else "#1f77b4" if c == "netkernel" else "#ff7f0e" for c in names]
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
