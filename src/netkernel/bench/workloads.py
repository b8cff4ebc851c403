"""The workloads: for each metric, its servers and load generators run in every
configuration in turn, repetition after repetition."""

from __future__ import annotations

import functools
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import TextIO, TypeVar

from .. import api, netns
from ..config import libdir
from .catalogue import (
    CONFIG_NAMES,
    IDLE,
    IDLE_SECONDS,
    PEERS,
    SIDES,
    BenchError,
    Metric,
    Options,
    configs_of,
)
from .parse import (
    ParseError,
    median,
    parse_crr,
    parse_iperf3,
    parse_redis_benchmark,
    parse_sockperf,
    parse_wrk,
    tail,
)
from .places import (
    COLO_TENANT,
    NATIVE_NS,
    NATIVE_V4,
    NOISY_TENANT,
    PEER_NS,
    PEER_V4,
    PYTHON,
    TENANT,
    Fabric,
    Place,
    program,
)
from .probes import (
    cpu_percent,
    kernel_slab_bytes,
    lowest_priority,
    lowest_tenant_priority,
    machine_idle_seconds,
    machine_info,
    private_bytes,
    proc_cpu_ticks,
    program_versions,
)
from .report import IdleResult, MetricResult, Report

T = TypeVar("T")

IPERF3_PORT = 5201
MUX_PORT = 5301  # the multiplexing workload's iperf3 servers: MUX_PORT + i
COLO_PORT = 7400  # the colocated servers: iperf3, sockperf +1, nginx +2, crr +3, redis +4
SOCKPERF_PORT = 11111
CRR_PORT = 7200
CRR_THREADS = 8
HTTP_PORT = 80
REDIS_PORT = 6379
IDLE_PORT = 7000
SINK_PORT = 7001
# The held connections' server: HELD_PORT + the run's number, so that no run's connections
# meet the TIME_WAIT sockets an earlier run left in the peer.
HELD_PORT = 7700
HELD = 9000  # this machine's hard limit of 20,000 fds bounds one engine near 10,000
HELD_QUICK = 2000
# The held_* metrics, each with its progress line (formatted with the run's figures).
HELD_FIGURES = {
    "held_connections": "{held_connections:,.0f} held",
    "held_open_seconds": "opened in {held_open_seconds:.2f} s",
    "held_memory_kib": "{held_memory_kib:.1f} KiB/conn (tenant region {region_kib_per_conn:.1f}, "
    "engine {engine_kib_per_conn:.1f}; kernel slab {kernel_slab_kib_per_conn:.1f} per connection)",
    "held_idle_cpu_percent": "engine + daemon {held_idle_cpu_percent:.2f} % of a core while idle "
    "(the machine {machine_idle_cpu_percent:.2f} %)",
}

IDLE_SETTLE = 1.0
WRK_CONNECTIONS = 32
REDIS_REQUESTS = 100_000
REDIS_CLIENTS = 32
REDIS_MANY_CLIENTS = 5000  # a cache with thousands of clients (issue 16)
NOISY_PAIRS = 3  # alone/beside pairs per noisy-neighbour sample (see m_noisy)


def url_host(addr: str) -> str:
    return f"[{addr}]" if ":" in addr else addr


# -- command lines: the same programs, the same options, wherever they run -----------------


def iperf3_client(addr: str, port: int, seconds: int) -> list[str]:
    return ["iperf3", "-c", addr, "-p", str(port), "-t", str(seconds), "-J", "--connect-timeout", "5000"]


def sockperf_server(addr: str, port: int) -> list[str]:
    return ["sockperf", "server", "--tcp", "-i", addr, "-p", str(port)]


def sockperf_ping_pong(addr: str, port: int, seconds: int) -> list[str]:
    """64-byte messages, one at a time."""
    return ["sockperf", "ping-pong", "--tcp", "-m", "64", "-t", str(seconds), "-i", addr, "-p", str(port)]


def wrk(url: str, seconds: int, close: bool = False) -> list[str]:
    """WRK_CONNECTIONS connections, kept alive or closed after each response."""
    return [
        "wrk",
        "-t1",
        f"-c{WRK_CONNECTIONS}",
        f"-d{seconds}s",
        *(["-H", "Connection: close"] if close else []),
        url,
    ]


def redis_server(port: int, bind: str | None = None) -> list[str]:
    """Nothing saved; protected mode off, which would refuse clients from other hosts."""
    return [
        "redis-server",
        "--save",
        "",
        "--appendonly",
        "no",
        "--protected-mode",
        "no",
        *(["--bind", bind] if bind else []),
        "--port",
        str(port),
    ]


def redis_benchmark(
    addr: str, port: int, test: str, requests: int, clients: int = REDIS_CLIENTS
) -> list[str]:
    return [
        "redis-benchmark",
        "-h",
        addr,
        "-p",
        str(port),
        "-t",
        test,
        "-n",
        str(requests),
        "-c",
        str(clients),
        "--csv",
    ]


class Bench(Fabric):
    """The measurements, in the fabric: each metric's workload run in each of its
    configurations, repetition after repetition, with progress lines as it goes."""

    def __init__(self, opts: Options, progress: TextIO | None = None) -> None:
        super().__init__(opts, progress)
        self.usermode_used: set[str] = set()  # run once: restarted before the next run
        # A count, not a duration: a quick pass must not wait on slirp4netns (~4k req/s).
        self.redis_requests = REDIS_REQUESTS // 5 if opts.quick else REDIS_REQUESTS
        self._engine_cpu: list[float] = []  # per NetKernel run of the current metric
        self._cpu: dict[str, list[float]] = {}  # machine-wide cores busy, per configuration
        self.step = 0
        self.total_steps = self._steps_through(None)
        # The held-connections runs, by (configuration, sample number): one run gives the
        # figures of all the held_* metrics.
        self._held_runs: dict[tuple[str, int], dict[str, float]] = {}

    # -- measurements -----------------------------------------------------------------------
    def sides(self, rep: int, m: Metric) -> Iterator[Place]:
        """The configurations in this repetition's order: rotated each time, so that each
        goes first in turn and drift favours none. A user-mode peer is restarted before each
        of its runs (the first run of the first workload has it fresh from setup)."""
        configs = configs_of(m, self.opts.configs)
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

    def repeat(self, res: MetricResult, run: Callable[[Place], tuple[float, str]]) -> None:
        """Every workload's loop: in each repetition each of the metric's configurations in
        turn (sides) does one run, which returns its sample and the text of its progress
        line. The sample counts once the whole run has succeeded; a failed run fails the
        workload, or for a user-mode peer is recorded (attempt)."""
        for rep in range(self.opts.repetitions):
            for place in self.sides(rep, res.metric):
                with self.attempt(res, place, rep):
                    sample, text = run(place)
                    res.samples[place.name].append(sample)
                    self.progress(res.metric, place, rep, text)

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
        self.say(
            f"[{self.step:>{width}}/{self.total_steps}] {m.name:<22} {place.name:<16} "
            f"run {rep + 1}/{self.opts.repetitions}: {text}"
        )

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
            "go_http_rps": self.m_go_http,
            "redis_get_rps": lambda r: self.m_redis(r, "get"),
            "redis_set_rps": lambda r: self.m_redis(r, "set"),
            "redis_get_5k_rps": lambda r: self.m_redis(r, "get", REDIS_MANY_CLIENTS),
            "noisy_neighbour_kept": self.m_noisy,
            **{f"mux{n}_gbps": functools.partial(self.m_mux, n=n) for n in (1, 4, 16)},
            "colo_iperf3_gbps": self.m_colo_iperf3,
            "colo_tcp_rr_p50_us": self.m_colo_sockperf,
            "colo_nginx_keepalive_rps": self.m_colo_nginx,
            "colo_tcp_crr_rps": self.m_colo_crr,
            "colo_redis_get_rps": self.m_colo_redis,
            **{name: self.m_held for name in HELD_FIGURES},
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

    def _parsed(self, parse: Callable[[str], T], out: str, place: Place, where: str) -> T:
        """The figure in a run's output, or the workload's error: the parser's, where the
        run was and, for a tenant, where the engine's side is logged."""
        try:
            return parse(out)
        except ParseError as e:
            raise BenchError(f"{e} ({where})" + self._log_hint(place)) from None

    def _parse_against(
        self,
        parse: Callable[[str], T],
        out: str,
        server: subprocess.Popen[bytes],
        place: Place,
        what: str,
        log: str,
    ) -> T:
        """The load generator's figure, from a run against a server of ours in place; an
        error if the figure is missing or the server died during the run."""
        value = self._parsed(parse, out, place, f"against {what} in {place.name}")
        if server.poll() is not None:
            raise BenchError(
                f"{what} ({place.name}) died during the run:\n"
                f"{tail(self.log_text(log))}" + self._log_hint(place)
            )
        return value

    @contextmanager
    def _peer_server(
        self, cmd: Sequence[str], port: int, what: str, sig: int = signal.SIGTERM
    ) -> Iterator[subprocess.Popen[bytes]]:
        """A server in the peer that all runs of a workload use: listening before the first,
        stopped with sig after the last."""
        log = f"{what}-peer.log"
        p = self.spawn(self.peer, cmd, log)
        try:
            self.wait_listening(PEER_NS, port, p, self.peer, what, log)
            yield p
        finally:
            self.stop(p, sig)

    @contextmanager
    def _run_server(
        self, place: Place, cmd: Sequence[str], port: int, what: str, log: str
    ) -> Iterator[subprocess.Popen[bytes]]:
        """A server for one run in place, accepting the peer's connections; stopped after."""
        p = self.spawn(place, cmd, log)
        try:
            self.wait_accepting(place.addr, port, p, place, what, log)
            yield p
        finally:
            self.stop(p)
            self.wait_gone(place, port)

    def m_iperf3(self, res: MetricResult, streams: int, receive: bool) -> None:
        d = self.opts.duration
        cmd = [*iperf3_client(PEER_V4, IPERF3_PORT, d), "-P", str(streams), *(["-R"] if receive else [])]
        retrans: dict[str, float] = {s: 0.0 for s in CONFIG_NAMES}

        def run(place: Place) -> tuple[float, str]:
            out = ""
            with self.engine_load(place):
                for _attempt in range(10):  # the server may still be finishing the last test
                    out = self.run(place, cmd, d + 60, "iperf3 client")
                    if "server is busy" not in out:
                        break
                    time.sleep(0.5)
            r = self._parsed(parse_iperf3, out, place, place.name)
            if server.poll() is not None:
                raise self._died(server, self.peer, "iperf3 server", "iperf3-server-peer.log")
            retrans[place.name] += r["retransmits"]
            return r["gbps"], f"{r['gbps']:.2f} Gbit/s"

        with self._peer_server(
            ["iperf3", "-s", "-p", str(IPERF3_PORT), "-B", PEER_V4], IPERF3_PORT, "iperf3-server"
        ) as server:
            self.repeat(res, run)
        for c in configs_of(res.metric, self.opts.configs):
            res.extra[f"{c.name}_retransmits"] = int(retrans[c.name])

    def m_sockperf(self, res: MetricResult) -> None:
        d = self.opts.duration
        p99: dict[str, list[float]] = {s: [] for s in CONFIG_NAMES}

        def run(place: Place) -> tuple[float, str]:
            with self.engine_load(place):
                out = self.run(
                    place, sockperf_ping_pong(PEER_V4, SOCKPERF_PORT, d), d + 60, "sockperf ping-pong"
                )
            r = self._parsed(parse_sockperf, out, place, place.name)
            if "p99_us" in r:
                p99[place.name].append(r["p99_us"])
            return r["p50_us"], f"p50 {r['p50_us']:.1f} us"

        with self._peer_server(
            sockperf_server(PEER_V4, SOCKPERF_PORT), SOCKPERF_PORT, "sockperf-server", signal.SIGINT
        ):
            self.repeat(res, run)
        for c in configs_of(res.metric, self.opts.configs):
            res.extra[f"{c.name}_p99_us"] = median(p99[c.name])

    def _crr_prog(self) -> Path:
        """netkernel-crr, copied where a tenant's users may run it (the package may be under
        a directory only root enters)."""
        prog = libdir() / "netkernel-crr"
        if not os.access(prog, os.X_OK):
            raise BenchError(
                f"{prog} not found (reinstall with `pip install .`, or set "
                "NETKERNEL_LIBDIR to a build directory)"
            )
        copy = self.tmp / "netkernel-crr"
        if not copy.exists():
            shutil.copy(prog, copy)
            copy.chmod(0o755)
        return copy

    def _crr_rate(self, res: MetricResult, out: str, place: Place, where: str) -> float:
        """netkernel-crr's connections/s. Its failed connections are counted for place, with
        the step and errno the client printed for its first few (a count alone says nothing
        about which call)."""
        got = parse_crr(out)
        if not got:
            raise BenchError(
                f"netkernel-crr: no 'connections/s' ({where}):\n{tail(out)}" + self._log_hint(place)
            )
        rate, n_err = got
        side = place.name
        res.extra[f"{side}_connection_errors"] = res.extra.get(f"{side}_connection_errors", 0) + n_err
        lines = re.findall(r"^netkernel-crr: (\w+: .*)$", out, re.M)
        if lines:
            key = f"{side}_connection_error_lines"
            res.extra[key] = (res.extra.get(key, []) + lines)[:5]
        return rate

    def m_crr(self, res: MetricResult) -> None:
        prog = self._crr_prog()
        d = self.opts.duration

        def run(place: Place) -> tuple[float, str]:
            with self.engine_load(place):
                out = self.run(
                    place,
                    [str(prog), "client", PEER_V4, str(CRR_PORT), str(d), str(CRR_THREADS)],
                    d + 60,
                    "netkernel-crr client",
                )
            rate = self._crr_rate(res, out, place, place.name)
            if server.poll() is not None:
                raise self._died(server, self.peer, "netkernel-crr server", "crr-server-peer.log")
            return rate, f"{rate:,.0f} connections/s"

        with self._peer_server(
            [str(prog), "server", PEER_V4, str(CRR_PORT)], CRR_PORT, "crr-server"
        ) as server:
            self.repeat(res, run)

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

    def _nginx(self, side: str, listen: str) -> tuple[list[str], Path]:
        """The command that runs one side's nginx, listening on listen, and its error log.
        The error log and temp directory are fresh, and writable by a tenant's nginx too
        (its root is not the host's)."""
        conf = self.tmp / f"nginx-{side}.conf"
        conf.write_text(program("nginx.conf").format(d=self.tmp, side=side, listen=listen))
        temp = self.tmp / f"tmp-{side}"
        shutil.rmtree(temp, ignore_errors=True)
        temp.mkdir()
        temp.chmod(0o1777)
        errlog = self.tmp / f"nginx-{side}.error.log"
        errlog.write_bytes(b"")
        errlog.chmod(0o666)
        return ["nginx", "-p", str(self.tmp), "-c", str(conf), "-e", str(errlog)], errlog

    def m_nginx(self, res: MetricResult, close: bool, path: str = "1k.bin") -> None:
        self._nginx_files()
        d = self.opts.duration
        errors: dict[str, dict[str, int]] = {
            s: {"connect": 0, "read": 0, "write": 0, "timeout": 0} for s in CONFIG_NAMES
        }
        non2xx = {s: 0 for s in CONFIG_NAMES}
        error_log_lines: dict[str, list[str]] = {s: [] for s in CONFIG_NAMES}

        def run(place: Place) -> tuple[float, str]:
            cmd, errlog = self._nginx(place.name, f"{url_host(place.listen or place.addr)}:{HTTP_PORT}")
            log = f"nginx-{place.name}.log"
            with self._run_server(place, cmd, HTTP_PORT, "nginx", log) as server:
                url = f"http://{url_host(place.addr)}:{HTTP_PORT}/{path}"
                with self.engine_load(place):
                    out = self.run(self.peer, wrk(url, d, close), d + 60, f"wrk against nginx ({place.name})")
                r = self._parse_against(parse_wrk, out, server, place, "nginx", log)
            for k, v in r.socket_errors.items():
                errors[place.name][k] += v
            non2xx[place.name] += r.non_2xx_3xx
            bad = [
                ln
                for ln in errlog.read_text(errors="replace").splitlines()
                if re.search(r"\[(error|crit|alert|emerg)\]", ln)
            ]
            error_log_lines[place.name] += bad
            note = ""
            if r.total_socket_errors or r.non_2xx_3xx:
                note = f" (socket errors {r.total_socket_errors}, non-2xx/3xx {r.non_2xx_3xx})"
            return r.requests_per_sec, f"{r.requests_per_sec:,.0f} req/s{note}"

        self.repeat(res, run)
        for c in configs_of(res.metric, self.opts.configs):
            s = c.name
            res.extra[f"{s}_socket_errors"] = errors[s]
            res.extra[f"{s}_non_2xx_3xx"] = non2xx[s]
            res.extra[f"{s}_nginx_error_log"] = error_log_lines[s][:5]
            res.extra[f"{s}_nginx_error_log_lines"] = len(error_log_lines[s])

    def _go_http(self) -> Path:
        """The Go server, built once per run where tenants may run it."""
        exe = self.tmp / "gohttp"
        if not exe.exists():
            env = dict(
                os.environ,
                CGO_ENABLED="0",
                GO111MODULE="off",
                GOCACHE=str(self.tmp / ".gocache"),
                GOPATH=str(self.tmp / ".gopath"),
            )
            src = self.tmp / "gohttp.go"
            src.write_text(program("gohttp.go"))
            r = subprocess.run(
                ["go", "build", "-o", str(exe), str(src)],
                capture_output=True,
                text=True,
                env=env,
                timeout=600,
            )
            if r.returncode != 0:
                raise BenchError(f"go build of the bench's Go server failed:\n{r.stdout}{r.stderr}")
            exe.chmod(0o755)
        return exe

    def m_go_http(self, res: MetricResult) -> None:
        exe = self._go_http()
        d = self.opts.duration

        errors: dict[str, dict[str, int]] = {}

        def run(place: Place) -> tuple[float, str]:
            log = f"gohttp-{place.name}.log"
            listen = f"{url_host(place.listen or place.addr)}:{HTTP_PORT}"
            with self._run_server(place, [str(exe), listen], HTTP_PORT, "Go server", log) as server:
                url = f"http://{url_host(place.addr)}:{HTTP_PORT}/1k.bin"
                with self.engine_load(place):
                    out = self.run(
                        self.peer, wrk(url, d, False), d + 60, f"wrk against the Go server ({place.name})"
                    )
                r = self._parse_against(parse_wrk, out, server, place, "Go server", log)
            mine = errors.setdefault(place.name, {})
            for k, v in r.socket_errors.items():
                mine[k] = mine.get(k, 0) + v
            note = f" (socket errors {r.socket_errors})" if r.total_socket_errors else ""
            return r.requests_per_sec, f"{r.requests_per_sec:,.0f} req/s{note}"

        self.repeat(res, run)
        for side, errs in errors.items():
            res.extra[f"{side}_socket_errors"] = errs

    def m_redis(self, res: MetricResult, test: str, clients: int = REDIS_CLIENTS) -> None:
        def run(place: Place) -> tuple[float, str]:
            log = f"redis-{place.name}.log"
            with self._run_server(place, redis_server(REDIS_PORT), REDIS_PORT, "redis-server", log) as server:
                # Its connection loop never gives up, hence the timeout (and the wait above).
                with self.engine_load(place):
                    out = self.run(
                        self.peer,
                        redis_benchmark(place.addr, REDIS_PORT, test, self.redis_requests, clients),
                        300,
                        f"redis-benchmark against redis-server ({place.name})",
                    )
                rps = self._parse_against(
                    lambda o: parse_redis_benchmark(o, test.upper()), out, server, place, "redis-server", log
                )
            return rps, f"{rps:,.0f} req/s"

        self.repeat(res, run)

    def m_mux(self, res: MetricResult, n: int) -> None:
        """n sandboxes each running one iperf3 stream to its own server in the peer, all at
        once; the sample is the sum. NetKernel: n tenants served by the one engine thread."""
        d = self.opts.duration
        places = self._mux_places(n)

        def run(side: Place) -> tuple[float, str]:
            clients = []
            with self.engine_load(side):
                for i, place in enumerate(places[side.name]):
                    log = f"mux-{side.name}-{i}.json"
                    clients.append(
                        (self.spawn(place, iperf3_client(PEER_V4, MUX_PORT + i, d), log), log, place)
                    )
                for p, _, place in clients:
                    try:
                        p.wait(timeout=d + 60)
                    except subprocess.TimeoutExpired:
                        raise BenchError(
                            f"iperf3 client ({place.name} {place.addr}) did not finish within {d + 60}s"
                        ) from None
            total = 0.0
            for p, log, place in clients:
                self.procs.remove(p)
                total += self._parsed(
                    parse_iperf3,
                    self.log_text(log),
                    place,
                    f"{place.name} {place.addr}, exit status {p.returncode}",
                )["gbps"]
            return total, f"{total:.2f} Gbit/s from {n} at once"

        with ExitStack() as servers:
            for i in range(n):
                servers.enter_context(
                    self._peer_server(
                        ["iperf3", "-s", "-p", str(MUX_PORT + i), "-B", PEER_V4],
                        MUX_PORT + i,
                        f"iperf3-server-{i}",
                    )
                )
            self.repeat(res, run)

    # -- colocated: both ends on this host -------------------------------------------------
    @staticmethod
    def _colo_log(server: Place, what: str) -> str:
        return f"{what}-{server.tenant or 'native'}.log"

    @contextmanager
    def _colo_server(
        self, server: Place, cmd: Sequence[str], port: int, what: str, sig: int = signal.SIGTERM
    ) -> Iterator[subprocess.Popen[bytes]]:
        """A server for a colocated run, waited for without a probe connection (iperf3 would
        count one as its test): ss in the namespace, or the engine's listener list; stopped
        with sig after the run."""
        log = self._colo_log(server, what)
        p = self.spawn(server, cmd, log)
        try:
            if server.tenant is None:
                self.wait_listening(NATIVE_NS, port, p, server, what, log)
            elif not self._until(lambda: self._tenant_listens(port), p, server, what, log, 20):
                raise BenchError(
                    f"{what} (tenant {COLO_TENANT}) not listening on port {port} after "
                    f"20s:\n{tail(self.log_text(log))}"
                )
            yield p
        finally:
            self.stop(p, sig)

    @staticmethod
    def _tenant_listens(port: int) -> bool:
        return any(
            c.get("kind") == "listener" and str(c.get("local", "")).endswith(f":{port}")
            for c in api.call("conns", tenant=COLO_TENANT)["conns"]
        )

    @staticmethod
    def _nsm_bytes() -> int:
        return sum(
            int(n.get("tx_bytes") or 0) + int(n.get("rx_bytes") or 0)
            for n in api.call("nsm-list").get("nsms", [])
        )

    @contextmanager
    def _colo_load(self, res: MetricResult, side: Place) -> Iterator[None]:
        """engine_load, and for NetKernel the bytes that went through an NSM meanwhile: on
        the shared-memory path, none (recorded, so a run that fell back shows)."""
        before = self._nsm_bytes() if side.tenant is not None else 0
        with self.engine_load(side):
            yield
        if side.tenant is not None:
            res.extra["netkernel_nsm_bytes"] = (
                res.extra.get("netkernel_nsm_bytes", 0) + self._nsm_bytes() - before
            )

    def m_colo_iperf3(self, res: MetricResult) -> None:
        d = self.opts.duration

        def run(side: Place) -> tuple[float, str]:
            client, server, addr = self._colo(side)
            with (
                self._colo_server(
                    server,
                    ["iperf3", "-s", "-1", "-p", str(COLO_PORT), "-B", addr],
                    COLO_PORT,
                    "colo-iperf3-server",
                ),
                self._colo_load(res, side),
            ):
                out = self.run(client, iperf3_client(addr, COLO_PORT, d), d + 60, "iperf3 client (colocated)")
            gbps = self._parsed(parse_iperf3, out, side, f"{side.name}, colocated")["gbps"]
            return gbps, f"{gbps:.2f} Gbit/s"

        self.repeat(res, run)

    def m_colo_sockperf(self, res: MetricResult) -> None:
        d = self.opts.duration
        port = COLO_PORT + 1

        def run(side: Place) -> tuple[float, str]:
            client, server, addr = self._colo(side)
            with (
                self._colo_server(
                    server, sockperf_server(addr, port), port, "colo-sockperf-server", signal.SIGINT
                ),
                self._colo_load(res, side),
            ):
                out = self.run(
                    client, sockperf_ping_pong(addr, port, d), d + 60, "sockperf ping-pong (colocated)"
                )
            p50 = self._parsed(parse_sockperf, out, side, f"{side.name}, colocated")["p50_us"]
            return p50, f"p50 {p50:.1f} us"

        self.repeat(res, run)

    def m_colo_nginx(self, res: MetricResult) -> None:
        self._nginx_files()
        d = self.opts.duration
        port = COLO_PORT + 2

        def run(side: Place) -> tuple[float, str]:
            client, server, addr = self._colo(side)
            cmd, _ = self._nginx(f"colo-{side.name}", f"{url_host(addr)}:{port}")
            with self._colo_server(server, cmd, port, "colo-nginx") as srv:
                with self._colo_load(res, side):
                    out = self.run(
                        client,
                        wrk(f"http://{url_host(addr)}:{port}/1k.bin", d),
                        d + 60,
                        "wrk against nginx (colocated)",
                    )
                r = self._parse_against(
                    parse_wrk, out, srv, server, "nginx", self._colo_log(server, "colo-nginx")
                )
            if r.total_socket_errors or r.non_2xx_3xx:
                raise BenchError(
                    f"wrk against nginx ({side.name}, colocated): socket errors "
                    f"{r.socket_errors}, non-2xx/3xx {r.non_2xx_3xx}"
                )
            return r.requests_per_sec, f"{r.requests_per_sec:,.0f} req/s"

        self.repeat(res, run)

    def m_colo_crr(self, res: MetricResult) -> None:
        prog = self._crr_prog()
        d = self.opts.duration
        port = COLO_PORT + 3

        def run(side: Place) -> tuple[float, str]:
            client, server, addr = self._colo(side)
            with (
                self._colo_server(server, [str(prog), "server", addr, str(port)], port, "colo-crr-server"),
                self._colo_load(res, side),
            ):
                out = self.run(
                    client,
                    [str(prog), "client", addr, str(port), str(d), str(CRR_THREADS)],
                    d + 60,
                    "netkernel-crr client (colocated)",
                )
            rate = self._crr_rate(res, out, side, f"{side.name}, colocated")
            return rate, f"{rate:,.0f} connections/s"

        self.repeat(res, run)

    def m_colo_redis(self, res: MetricResult) -> None:
        port = COLO_PORT + 4

        def run(side: Place) -> tuple[float, str]:
            client, server, addr = self._colo(side)
            with self._colo_server(server, redis_server(port, addr), port, "colo-redis") as srv:
                with self._colo_load(res, side):
                    out = self.run(
                        client,
                        redis_benchmark(addr, port, "get", self.redis_requests),
                        300,
                        "redis-benchmark (colocated)",
                    )
                rps = self._parse_against(
                    lambda o: parse_redis_benchmark(o, "GET"),
                    out,
                    srv,
                    server,
                    "redis-server",
                    self._colo_log(server, "colo-redis"),
                )
            return rps, f"{rps:,.0f} req/s"

        self.repeat(res, run)

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

        def rate(place: Place) -> float:
            out = self.run(place, sockperf_ping_pong(PEER_V4, SOCKPERF_PORT, d), d + 60, "sockperf ping-pong")
            r = self._parsed(parse_sockperf, out, place, place.name)
            if not r.get("avg_us"):
                raise BenchError(f"sockperf: no 'avg-latency' figure ({place.name})\n{tail(out)}")
            return 1e6 / (2 * r["avg_us"])  # sockperf's latency is half the round trip

        def pairs(place: Place, noisy: Place) -> tuple[float, float, dict[str, float]]:
            """NOISY_PAIRS alone/beside pairs against a flood from noisy: the summed rates
            and, for a flood from a tenant, where the engine's time went while it ran."""
            log = f"flood-{noisy.name}.log"
            flood = self.spawn(
                noisy,
                ["nice", "-n", "19", PYTHON, "-c", program("flood.py"), PEER_V4, str(SINK_PORT), "3600"],
                log,
            )
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
        split: dict[str, list[float]] = {
            "quiet_engine_seconds": [],
            "noisy_engine_seconds": [],
            "noisy_rounds_sat_out": [],
        }
        outside: list[float] = []

        def run(place: Place) -> tuple[float, str]:
            a, b, moved = pairs(place, noisy_nk if place.tenant else noisy_native)
            for k, v in moved.items():
                split[k].append(round(v, 3))
            alone[place.name].append(round(a / NOISY_PAIRS))
            beside[place.name].append(round(b / NOISY_PAIRS))
            text = (
                f"{a / NOISY_PAIRS:,.0f} round trips/s alone, {b / NOISY_PAIRS:,.0f} "
                f"beside the flood ({NOISY_PAIRS} pairs): kept {b / a:.2f}"
            )
            if place.tenant:
                # The control: the same flood from the native namespace, which never
                # enters NetKernel. What the tenant loses to it is the machine's share
                # (CPUs, the sink's kernel work), not the engine's.
                a2, b2, _ = pairs(place, noisy_native)
                outside.append(round(b2 / a2, 3))
                text += f"; beside a flood outside NetKernel: kept {b2 / a2:.2f}"
            return b / a, text

        with self._peer_server(
            ["nice", "-n", "19", PYTHON, "-c", program("sink.py"), PEER_V4, str(SINK_PORT)], SINK_PORT, "sink"
        ) as sink:
            lowest_priority(sink.pid)
            with self._peer_server(
                sockperf_server(PEER_V4, SOCKPERF_PORT), SOCKPERF_PORT, "sockperf-server", signal.SIGINT
            ):
                self.repeat(res, run)
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
        return {
            "quiet_engine_seconds": float(q.get("engine_seconds") or 0.0),
            "noisy_engine_seconds": float(n.get("engine_seconds") or 0.0),
            "noisy_rounds_sat_out": float(n.get("engine_skips") or 0),
        }

    def m_held(self, res: MetricResult) -> None:
        """The held_* metrics: each run's figures come from one held-connections run on that
        side, made by whichever of these metrics comes first."""
        name = res.metric.name

        def run(place: Place) -> tuple[float, str]:
            key = (place.name, len(res.samples[place.name]))
            if key not in self._held_runs:
                self._held_runs[key] = self._hold(place, HELD_PORT + len(self._held_runs))
            r = self._held_runs[key]
            for k, v in r.items():
                if k not in HELD_FIGURES:  # the parts of a figure, kept per configuration
                    res.extra.setdefault(f"{place.name}_{k}", []).append(round(v, 3))
            self._cpu.setdefault(place.name, []).append(r["open_cpu_cores"])
            if r["open_engine_cpu_percent"] >= 0:
                self._engine_cpu.append(r["open_engine_cpu_percent"])
            return r[name], HELD_FIGURES[name].format(**r)

        self.repeat(res, run)

    def _hold(self, place: Place, port: int) -> dict[str, float]:
        """One run: the server (in place) holds n connections from one client in the peer.
        Memory is measured once all are open and answered, CPU while they are idle; then each
        speaks again, all close, and both ends must report every connection answered."""
        n = HELD_QUICK if self.opts.quick else HELD
        log = f"held-{place.name}-{port}.log"
        server = self.spawn(place, [PYTHON, "-c", program("hold_server.py"), str(port), str(n)], log)
        client: subprocess.Popen[bytes] | None = None
        try:
            # Its READY line, not a probe connection: the server counts every connection.
            if not self._until(lambda: "READY" in self.log_text(log), server, place, "hold server", log, 20):
                raise BenchError(
                    f"hold server ({place.name}) not ready after 20s:\n{tail(self.log_text(log))}"
                )
            status = api.ping() or {}
            engine = int(status["engine_pid"]) if place.tenant else None
            watched = [engine, int(status["pid"])] if engine else []

            def netkernel_bytes() -> tuple[int, int]:
                """The tenant region's committed bytes and the engine's private memory."""
                if engine is None:
                    return 0, 0
                ps = {t.get("name"): t for t in api.call("ps").get("tenants", [])}
                return int(ps[place.tenant]["region_bytes"] or 0), private_bytes(engine)

            slab0, (_, engine0) = kernel_slab_bytes(), netkernel_bytes()
            t0 = time.monotonic()
            with self.engine_load(place):
                client = subprocess.Popen(
                    self.peer.argv(
                        [PYTHON, "-c", program("hold_client.py"), place.addr, str(port), str(n), PEER_V4]
                    ),
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    cwd=self.tmp,
                    start_new_session=True,
                )
                self.procs.append(client)
                assert client.stdin is not None and client.stdout is not None
                opened = client.stdout.readline().decode(errors="replace").split()
            if opened[:2] != ["OPEN", str(n)]:
                out = " ".join(opened) + client.stdout.read().decode(errors="replace")
                raise BenchError(
                    f"hold client against {place.name}: {tail(out)}\nserver: {tail(self.log_text(log))}"
                    + self._log_hint(place)
                )
            open_seconds = float(opened[2]) if len(opened) > 2 else time.monotonic() - t0
            # engine_load's figures, kept with the run's: each held_* metric reports them.
            open_cores = self._cpu[place.name].pop()
            open_engine = self._engine_cpu.pop() if engine and self._engine_cpu else -1.0
            time.sleep(IDLE_SETTLE)
            slab1, (region1, engine1) = kernel_slab_bytes(), netkernel_bytes()
            (idle0, cpus), t1 = machine_idle_seconds(), time.monotonic()
            pct = cpu_percent(watched, IDLE_SECONDS) if watched else {}
            if not watched:
                time.sleep(IDLE_SECONDS)
            idle1, _ = machine_idle_seconds()
            elapsed = max(time.monotonic() - t1, 1e-6)
            idle_pct = max(0.0, cpus - (idle1 - idle0) / elapsed) * 100.0
            client.stdin.write(b"go\n")
            client.stdin.flush()
            out = client.communicate(timeout=300)[0].decode(errors="replace")
            server.wait(timeout=120)
            summary = self.log_text(log)
            if client.returncode != 0 or f"DONE {n}" not in out or server.returncode != 0:
                raise BenchError(
                    f"held connections ({place.name}): client exit {client.returncode}: {tail(out)}\n"
                    f"server exit {server.returncode}: {tail(summary)}" + self._log_hint(place)
                )
            if f"accepted={n} answered={2 * n} errors=0" not in summary:
                raise BenchError(f"held connections ({place.name}): the server says {tail(summary)}")
        except (OSError, KeyError, ValueError, subprocess.TimeoutExpired) as e:
            raise BenchError(f"held connections ({place.name}): {e}" + self._log_hint(place)) from None
        finally:
            for p in (client, server):
                if p is not None:
                    self.stop(p)
        slab = max(0, slab1 - slab0) / 1024 / n
        # All the region holds, not its growth: a run right after another finds the last
        # run's rings still warm (they cool within seconds), and its growth would be nil.
        region = region1 / 1024 / n
        private = max(0, engine1 - engine0) / 1024 / n
        return {
            "held_connections": float(n),
            "held_open_seconds": open_seconds,
            # Native: both ends are sockets of this kernel, hence per socket; NetKernel: its own.
            "held_memory_kib": region + private if engine else slab / 2,
            "held_idle_cpu_percent": sum(pct.values()),
            "kernel_slab_kib_per_conn": slab,
            "region_kib_per_conn": region,
            "engine_kib_per_conn": private,
            "machine_idle_cpu_percent": idle_pct,
            "open_cpu_cores": open_cores,
            "open_engine_cpu_percent": open_engine,
        }

    def m_idle(self) -> IdleResult:
        assert self.tenant is not None
        res = IdleResult()
        try:
            status = api.ping()
            if status is None:
                raise BenchError("the daemon is not running any more")
            daemon_pid, engine_pid = int(status["pid"]), int(status["engine_pid"])
            listener = [PYTHON, "-c", program("idle.py"), self.tenant.addr, str(IDLE_PORT)]
            with self._run_server(self.tenant, listener, IDLE_PORT, "idle listener", "idle-netkernel.log"):
                addr = self.tenant.addr

                def connect() -> socket.socket:
                    return socket.create_connection((addr, IDLE_PORT), timeout=5)

                held = netns.run_in_netns(PEER_NS, connect)
                try:
                    time.sleep(IDLE_SETTLE)  # let the engine's post-work polling wind down
                    tenant_pids = netns.pids_in_netns(self.tenant_netns)
                    pids = [engine_pid, daemon_pid, *tenant_pids]
                    self.say(
                        f"{IDLE}: measuring engine (pid {engine_pid}) and daemon (pid "
                        f"{daemon_pid}) for {IDLE_SECONDS:.0f} s; tenant idle with a "
                        "listener and one open connection"
                    )
                    pct = cpu_percent(pids, IDLE_SECONDS)
                finally:
                    held.close()
            res.engine, res.daemon = pct[engine_pid], pct[daemon_pid]
            res.tenant = sum(pct[p] for p in tenant_pids)
            res.percent = res.engine + res.daemon
            self.say(
                f"{IDLE}: {res.percent:.2f} % (engine {res.engine:.2f} %, "
                f"daemon {res.daemon:.2f} %, tenant processes {res.tenant:.2f} %)"
            )
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
        settings = {
            "duration": self.opts.duration,
            "repetitions": self.opts.repetitions,
            "quick": self.opts.quick,
            "wrk_connections": WRK_CONNECTIONS,
            "configurations": {c.name: c.what for c in self.opts.configs},
            "redis_requests": self.redis_requests,
            "redis_clients": REDIS_CLIENTS,
            "idle_seconds": IDLE_SECONDS,
            "daemon_started_by_bench": self.started_daemon,
            "peer": f"{PEER_NS} {PEER_V4}",
            "native": f"{NATIVE_NS} {NATIVE_V4}",
            "tenant": f"{TENANT} {self.tenant.addr if self.tenant else '-'}",
        }
        return Report(results, idle, machine, settings)
