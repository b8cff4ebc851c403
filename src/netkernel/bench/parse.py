"""The figures in the output of the programs the bench runs, and the statistics of them."""

from __future__ import annotations

import json
import re
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field

from .catalogue import BenchError


class ParseError(BenchError):
    """A program's output did not contain the figure we need."""


def tail(text: str, lines: int = 15) -> str:
    """The last lines of a program's output, for an error message."""
    return "\n".join(text.strip().splitlines()[-lines:])


def parse_iperf3(text: str) -> dict[str, float]:
    """``iperf3 -J`` client report → {"gbps": receiver Gbit/s, "retransmits": n}.

    iperf3 3.12 exits 0 even when the test failed; the error is in the report's "error".
    """
    try:
        rep = json.loads(text)
    except json.JSONDecodeError:
        raise ParseError(f"iperf3: the output is not a JSON report:\n{tail(text)}") from None
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


def strip_ansi(text: str) -> str:
    """text without ANSI colour codes, which sockperf prints even into a pipe."""
    return _ANSI.sub("", text)


def parse_sockperf(text: str) -> dict[str, float]:
    """``sockperf ping-pong`` output → {"p50_us", "p99_us", "avg_us"} (sockperf reports usec).

    sockperf 3.7 exits 0 even when it could not connect: no percentiles means failure.
    """
    text = strip_ansi(text)
    pcts = {m[1]: float(m[2]) for m in _SOCKPERF_PCT.finditer(text)}
    if "50.000" not in pcts:
        err = _SOCKPERF_ERR.search(text)
        why = err[1].strip() if err else "no 'percentile 50.000' line"
        raise ParseError(f"sockperf: {why}\n{tail(text)}")
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
        default_factory=lambda: {"connect": 0, "read": 0, "write": 0, "timeout": 0}
    )
    non_2xx_3xx: int = 0

    @property
    def total_socket_errors(self) -> int:
        return sum(self.socket_errors.values())


def parse_wrk(text: str) -> WrkResult:
    """wrk's summary → requests/s, request count, "Socket errors" and non-2xx/3xx counts."""
    rps = re.search(r"^Requests/sec:\s*([0-9.]+)", text, re.M)
    if not rps:
        raise ParseError(f"wrk: no 'Requests/sec' in its output:\n{tail(text)}")
    n = re.search(r"^\s*(\d+) requests in ", text, re.M)
    res = WrkResult(float(rps[1]), int(n[1]) if n else 0)
    se = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    if se:
        res.socket_errors = dict(
            zip(("connect", "read", "write", "timeout"), map(int, se.groups()), strict=True)
        )
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
    raise ParseError(f"redis-benchmark: no {test} result in its output:\n{tail(text)}")


def parse_crr(text: str) -> tuple[float, int] | None:
    """netkernel-crr's report → (connections/s, failed connections), None without a rate."""
    m = re.search(r"^connections/s ([0-9.]+)$", text, re.M)
    e = re.search(r"^errors (\d+)$", text, re.M)
    return (float(m[1]), int(e[1]) if e else 0) if m else None


def median(xs: Sequence[float]) -> float | None:
    return float(statistics.median(xs)) if xs else None


def ratio(native: float | None, netkernel: float | None) -> float | None:
    if native is None or netkernel is None or native == 0:
        return None
    return netkernel / native
