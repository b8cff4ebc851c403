"""Operator control, measured with real programs (issue 3).

Each test adds the NSMs it needs to the session's daemon at run time (`netkernel nsm add`),
so the suite starts only one daemon. Rates come from iperf3's receiver, request/response rates
from sockperf; every figure is printed, and only the bounds the issue sets are asserted.
"""

from __future__ import annotations

import json
import re
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import TENANT_PY, Daemon, Peer, Tenant, nk, wait_port

from netkernel.bench import lowest_priority, lowest_tenant_priority, program

PROGS = Path(__file__).resolve().parent.parent / "apps" / "progs"
LOG = Path("/var/log/netkernel.log")


def uname(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:5]}"


@pytest.fixture
def nsm(nk_daemon: Daemon) -> Iterator[Callable[..., str]]:
    """Factory: add an NSM with options; removed (with a bottleneck the test put on it) after."""
    made: list[str] = []

    def make(prefix: str, *options: str) -> str:
        name = f"{prefix}{uuid.uuid4().hex[:4]}"
        nk("nsm", "add", name, *options, check=True)
        made.append(name)
        return name

    yield make
    for name in made:
        for t in nk_daemon.ps():
            if t["nsm"] == name:
                nk("tenant", "delete", t["name"])
        proc = nk("nsm", "remove", name)
        assert proc.returncode == 0, f"nsm remove {name}: {proc.stderr}"


def nsm_netns(name: str) -> str:
    return f"nk-nsm-{name}"


def iperf3_json(runner: Tenant | Peer, args: list[str], timeout: float = 60) -> dict[str, Any]:
    proc = runner.run(["iperf3", "-J", *args], capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"iperf3 {args} failed: {proc.stdout[-2000:]}{proc.stderr[-2000:]}"
    return dict(json.loads(proc.stdout))


def received_mbit(result: dict[str, Any]) -> float:
    return float(result["end"]["sum_received"]["bits_per_second"]) / 1e6


def iperf3_server(peer: Peer, port: int, count: int = 1) -> list[subprocess.Popen[Any]]:
    """count iperf3 servers on port, port+1, ... (not one-shot: the readiness probe is a
    connection too); the peer fixture stops them."""
    procs = [
        peer.popen(
            ["iperf3", "-s", "-p", str(port + i)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        for i in range(count)
    ]
    for i in range(count):
        wait_port(peer, peer.ipv4, port + i)
    return procs


def run_parallel(*jobs: tuple[Tenant | Peer, list[str]], timeout: float = 60) -> list[dict[str, Any]]:
    """Start several iperf3 clients at once (each in its tenant or namespace); their JSON
    results."""
    procs = [
        t.popen(["iperf3", "-J", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for t, args in jobs
    ]
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=timeout)
        assert p.returncode == 0, f"iperf3 failed: {stdout[-2000:]}{stderr[-2000:]}"
        out.append(json.loads(stdout))
    return out


def conns(tenant: str) -> list[dict[str, Any]]:
    return list(json.loads(nk("conns", "--tenant", tenant, "--json", check=True).stdout)["conns"])


# -- congestion control per NSM ------------------------------------------------------------------


def test_each_nsm_runs_its_own_congestion_control(
    nsm: Callable[..., str], tenant: Callable[..., Tenant], peer_ns: Callable[[], Peer]
) -> None:
    peer = peer_ns()
    chosen = {
        nsm("cr", "--congestion-control", "reno"): "reno",
        nsm("cb", "--congestion-control", "bbr"): "bbr",
    }
    port = 5301
    for name, ca in chosen.items():
        t = tenant(uname("cc"), name)
        iperf3_server(peer, port)
        client = t.popen(
            ["iperf3", "-c", peer.ipv4, "-p", str(port), "-t", "3"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(1.5)
        # The NSM's own view, read inside its namespace by the kernel's ss.
        ss = subprocess.run(
            ["ip", "netns", "exec", nsm_netns(name), "ss", "-tin", "dst", peer.ipv4],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        seen = set(re.findall(r"^\s+(reno|bbr|cubic)\b", ss, re.M))
        # And the engine's, from TCP_INFO on the same sockets.
        engine_view = {c.get("ca") for c in conns(t.name) if c.get("proto") == "tcp"}
        client.wait(timeout=30)
        print(f"nsm {name}: ss says {sorted(seen)}, conns says {sorted(engine_view - {None})}")
        assert seen == {ca}, f"NSM {name} configured for {ca}, ss shows:\n{ss}"
        assert engine_view - {None} == {ca}
        port += 1


# -- rate limits -------------------------------------------------------------------------------


INTERVAL = re.compile(r"\]\s+[\d.]+-([\d.]+)\s+sec\s.*?([\d.]+) ([KMG]?)bits/sec\s+\d+\s")


def stream_seconds(proc: subprocess.Popen[str], out: list[tuple[float, float]]) -> None:
    """Read an iperf3 client's per-second lines (--forceflush) as they come: (monotonic time
    the second ended, Mbit/s). The arrival time places each second more precisely than
    iperf3's JSON, whose clock starts at an unknown moment after the program does."""
    assert proc.stdout is not None
    for line in proc.stdout:
        m = INTERVAL.search(line)
        if m:
            scale = {"": 1e-6, "K": 1e-3, "M": 1.0, "G": 1e3}[m.group(3)]
            out.append((time.monotonic(), float(m.group(2)) * scale))


def test_rate_limit_holds_and_leaves_neighbours_alone(
    tenant: Callable[..., Tenant], peer_ns: Callable[[], Peer]
) -> None:
    peer = peer_ns()
    limited, free = tenant(uname("lim")), tenant(uname("free"))
    nk("tenant", "set", limited.name, "--rate-tx", "200Mbit", "--rate-rx", "200Mbit", check=True)

    # The unlimited tenant streams (killed when done) while the limited one runs four times
    # (egress, ingress, egress, ingress) with gaps between; the stream's seconds are sorted into
    # "beside" and "alone". On two vCPUs a stream's rate switches between levels a quarter
    # apart every few seconds, so separate runs alone and beside measured that (this test failed
    # so twice); one stream, alternately alone and beside, does not.
    iperf3_server(peer, 5401, count=3)
    seconds: list[tuple[float, float]] = []
    stream = free.popen(
        ["iperf3", "--forceflush", "-c", peer.ipv4, "-p", "5401", "-t", "90"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    reader = threading.Thread(target=stream_seconds, args=(stream, seconds), daemon=True)
    reader.start()
    busy: list[tuple[float, float]] = []  # when the limited tenant ran (monotonic)
    up: list[float] = []
    down: list[float] = []
    time.sleep(5)
    for direction in (up, down, up, down):
        began = time.monotonic()
        reverse = ["-R"] if direction is down else []
        direction.append(
            received_mbit(
                iperf3_json(
                    limited,
                    [
                        "-c",
                        peer.ipv4,
                        "-p",
                        "5402" if direction is up else "5403",
                        "-t",
                        "4",
                        "-O",
                        "1",
                        *reverse,
                    ],
                )
            )
        )
        busy.append((began, time.monotonic()))
        # Four seconds: a second counts as "alone" only if it lies 0.5 s clear of the
        # limited runs, so a three-second gap held one or two such seconds depending on
        # phase and the test once counted 7 of the 8 it needs.
        time.sleep(4)
    stream.kill()
    stream.wait()
    reader.join(timeout=10)

    # A second counts if all of it lies on one side; the first second after the limited
    # program starts (its setup) and after it ends (its teardown) count for neither, nor
    # does the stream's first second (slow start).
    alone_s, beside_s = [], []
    for end, mbit in seconds[1:]:
        lo, hi = end - 1.05, end + 0.05
        if any(b + 0.5 <= lo and hi <= e for b, e in busy):
            beside_s.append(mbit)
        elif not any(lo < e + 0.5 and hi > b for b, e in busy):
            alone_s.append(mbit)
    print("seconds alone", [round(x) for x in alone_s], "beside", [round(x) for x in beside_s])
    assert len(alone_s) >= 8 and len(beside_s) >= 8, f"stream: {seconds}, limited: {busy}"
    alone, beside = sum(alone_s) / len(alone_s), sum(beside_s) / len(beside_s)
    print(
        f"limited egress {up[0]:.1f} and {up[1]:.1f} Mbit/s, ingress {down[0]:.1f} and "
        f"{down[1]:.1f}; unlimited tenant alone {alone:.0f} Mbit/s ({len(alone_s)} s), beside "
        f"the limited one {beside:.0f} Mbit/s ({len(beside_s)} s): {beside / alone:.2f}"
    )
    assert all(180 <= x <= 220 for x in up + down)
    assert beside >= 0.75 * alone, "the unlimited tenant was slowed"
    ps = {t["name"]: t for t in json.loads(nk("ps", "--json", check=True).stdout)["tenants"]}
    lim = ps[limited.name]
    print(
        f"limited tenant: {lim['throttle_wakes']} throttled wakes, "
        f"{lim['throttle_late_seconds']:.3f} s late in total, "
        f"{lim['rate_late_credit_bytes'] / 1e6:.1f} MB of rate tokens kept over them"
    )
    assert lim["tx_bytes"] > 0


def test_rate_limit_holds_when_the_engine_is_late(
    nk_daemon: Daemon, tenant: Callable[..., Tenant], peer_ns: Callable[[], Peer]
) -> None:
    """A rate-limited tenant's sockets wait for tokens; when the engine wakes them late (busy
    with a flood, or off the CPU), the tokens that accrued meanwhile are still the tenant's.
    The engine is stopped for 20 ms of every 60 ms: a token bucket capped at its 2 ms burst
    would give ~75 Mbit/s of the 100 allowed; the limit is also never exceeded."""
    import os
    import signal

    peer = peer_ns()
    t = tenant(uname("late"))
    nk("tenant", "set", t.name, "--rate-tx", "100Mbit", "--rate-rx", "100Mbit", check=True)
    iperf3_server(peer, 5411, count=2)
    engine = int(nk_daemon.status()["engine_pid"])
    done = threading.Event()

    def hiccups() -> None:
        while not done.is_set():
            os.kill(engine, signal.SIGSTOP)
            time.sleep(0.02)
            os.kill(engine, signal.SIGCONT)
            time.sleep(0.04)

    stopper = threading.Thread(target=hiccups, daemon=True)
    stopper.start()
    try:
        got = [
            received_mbit(iperf3_json(t, ["-c", peer.ipv4, "-p", "5411", "-t", "5", "-O", "1", *extra]))
            for extra in ([], ["-R"])
        ]
    finally:
        done.set()
        stopper.join(timeout=5)
        os.kill(engine, signal.SIGCONT)
    lim = {x["name"]: x for x in json.loads(nk("ps", "--json", check=True).stdout)["tenants"]}[t.name]
    print(
        f"egress {got[0]:.1f}, ingress {got[1]:.1f} Mbit/s of 100 with the engine stopped a "
        f"third of the time; {lim['throttle_late_seconds']:.2f} s late over "
        f"{lim['throttle_wakes']} wakes, {lim['rate_late_credit_bytes'] / 1e6:.1f} MB kept"
    )
    assert all(92 <= x <= 105 for x in got), got
    assert lim["rate_late_credit_bytes"] > 0


# -- fair sharing of a bottleneck between tenants ------------------------------------------------


BOTTLENECK = "500mbit"


def add_bottleneck(nsm_name: str) -> None:
    """A 500 Mbit/s link out of the NSM namespace (tbf on its eth0)."""
    subprocess.run(
        [
            "ip",
            "netns",
            "exec",
            nsm_netns(nsm_name),
            "tc",
            "qdisc",
            "add",
            "dev",
            "eth0",
            "root",
            "tbf",
            "rate",
            BOTTLENECK,
            "burst",
            "256kb",
            "latency",
            "20ms",
        ],
        check=True,
        capture_output=True,
    )


def share(one: Tenant | Peer, eight: Tenant | Peer, peer: Peer, port: int) -> tuple[float, float]:
    iperf3_server(peer, port, count=2)
    a, b = run_parallel(
        (one, ["-c", peer.ipv4, "-p", str(port), "-t", "8", "-O", "2"]),
        (eight, ["-c", peer.ipv4, "-p", str(port + 1), "-t", "8", "-O", "2", "-P", "8"]),
    )
    return received_mbit(a), received_mbit(b)


def test_bottleneck_is_shared_by_tenant_not_by_flow(
    nsm: Callable[..., str], tenant: Callable[..., Tenant], peer_ns: Callable[[], Peer]
) -> None:
    peer = peer_ns()
    fair = nsm("fa", "--bandwidth", "500Mbit")
    add_bottleneck(fair)

    # The kernel alone shares per flow: two programs run straight in the NSM's namespace (no
    # engine in between) and the one with 8 connections takes most. (Tenants on an NSM without
    # --bandwidth are no baseline: the engine's rounds between tenants already even them out
    # somewhat, 0.3-0.4 and once 0.94 here.)
    # Through tbf's FIFO the kernel's split is chaotic run to run (0.12 to 1.06 seen here; this
    # kernel has no flow-fair qdisc to make it steady), and the control only has to show that
    # the bottleneck can make the kernel unfair: up to three tries, each printed.
    kernel = Peer(nsm_netns(fair), 0)
    for attempt in range(3):
        a0, b0 = share(kernel, kernel, peer, 5501 + 10 * attempt)
        print(f"kernel only, try {attempt + 1}: 1 flow {a0:.0f} vs 8 flows {b0:.0f} Mbit/s")
        if a0 / b0 < 0.8:
            break
    a, b = tenant(uname("a"), fair), tenant(uname("b"), fair)
    a1, b1 = share(a, b, peer, 5503)
    nk("tenant", "set", a.name, "--weight", "2", check=True)
    a2, b2 = share(a, b, peer, 5505)
    print(
        f"kernel only: 1 flow {a0:.0f} vs 8 flows {b0:.0f} Mbit/s, ratio {a0 / b0:.2f}\n"
        f"NetKernel, equal weights: {a1:.0f} vs {b1:.0f}, ratio {a1 / b1:.2f}\n"
        f"NetKernel, weights 2:1: {a2:.0f} vs {b2:.0f}, ratio {a2 / b2:.2f}"
    )
    assert a0 / b0 < 0.8, "the bottleneck did not make the kernel unfair: the test proves nothing"
    assert 0.8 <= a1 / b1 <= 1.25
    assert 1.6 <= a2 / b2 <= 2.5


# -- a noisy tenant ----------------------------------------------------------------------------

# Not the bench's flood (netkernel/bench/programs/flood.py): without its TCP_NODELAY, as the
# bounds below were set for.
NOISY = """
import socket, sys, time
socks = [socket.create_connection((sys.argv[1], int(sys.argv[2]))) for _ in range(200)]
for s in socks:
    s.setblocking(False)
end = time.monotonic() + float(sys.argv[3])
while time.monotonic() < end:
    for s in socks:
        try:
            s.send(b"x" * 16)
        except BlockingIOError:
            pass
"""

# The bench's sink (it prints READY once it listens).
SINK = program("sink.py")


def rr_rate(t: Tenant, peer: Peer, seconds: int = 6) -> float:
    """Round trips per second of one 64-byte request/response stream (sockperf ping-pong)."""
    proc = t.run(
        ["sockperf", "ping-pong", "--tcp", "-i", peer.ipv4, "-p", "11111", "-m", "64", "-t", str(seconds)],
        capture_output=True,
        text=True,
    )
    m = re.search(r"Latency is ([\d.]+) usec", proc.stdout + proc.stderr)
    assert m, f"sockperf: {proc.stdout[-1500:]}{proc.stderr[-1500:]}"
    return 1e6 / float(m.group(1))


def test_noisy_tenant_is_held_to_its_share_of_the_engine(
    tenant: Callable[..., Tenant], peer_ns: Callable[[], Peer]
) -> None:
    """A tenant flooding the engine (200 connections, 16-byte writes) beside a quiet one with
    a request/response stream: the engine makes the flooder sit out rounds once it is over
    its weighted share of engine time, never the quiet one, and the quiet one keeps being
    served. How much of its rate it keeps is a timing figure: `netkernel bench` measures it
    (noisy_neighbour_kept) against the same flood run natively."""
    peer = peer_ns()
    quiet, noisy = tenant(uname("quiet")), tenant(uname("noisy"))
    nk("tenant", "set", quiet.name, "--weight", "9", check=True)
    peer.popen(
        ["sockperf", "server", "--tcp", "-i", peer.ipv4, "-p", "11111"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    # The sink stands for another machine: it must not take the quiet tenant's CPU either.
    sink = peer.popen(
        ["nice", "-n", "19", TENANT_PY, "-c", SINK, peer.ipv4, "7000"],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    lowest_priority(sink.pid)
    assert sink.stdout and sink.stdout.readline().strip() == "READY"
    wait_port(peer, peer.ipv4, 11111)
    alone = rr_rate(quiet, peer)
    # The flooder's program runs at the lowest CPU priority: what is looked at is the engine,
    # not the CPU scheduler of a two-core machine.
    flood = noisy.popen(
        ["nice", "-n", "19", TENANT_PY, "-c", NOISY, peer.ipv4, "7000", "14"], start_new_session=True
    )
    lowest_priority(flood.pid)
    # A tenant's processes are in its own cgroup, where nice and the autogroup weigh only
    # against each other: the cgroup's weight is what sets them against the quiet tenant.
    lowest_tenant_priority(noisy.name)
    time.sleep(3)
    before = {t["name"]: t for t in json.loads(nk("ps", "--json", check=True).stdout)["tenants"]}
    beside = rr_rate(quiet, peer)
    after = {t["name"]: t for t in json.loads(nk("ps", "--json", check=True).stdout)["tenants"]}
    flood.wait(timeout=60)
    flooded = after[noisy.name]["tx_bytes"]
    engine = {n: after[n]["engine_seconds"] - before[n]["engine_seconds"] for n in (quiet.name, noisy.name)}
    skips = {n: after[n]["engine_skips"] - before[n]["engine_skips"] for n in (quiet.name, noisy.name)}
    print(
        f"quiet tenant (weight 9): {alone:.0f} round trips/s alone, {beside:.0f} beside the "
        f"flood ({beside / alone:.2f}); engine time while both ran: quiet "
        f"{engine[quiet.name]:.2f} s, noisy {engine[noisy.name]:.2f} s; rounds sat out: "
        f"quiet {skips[quiet.name]}, noisy {skips[noisy.name]}; noisy sent {flooded / 1e6:.0f} MB"
    )
    assert flooded > 50e6, "the noisy tenant did not flood"
    assert skips[noisy.name] > 0 and skips[quiet.name] == 0, skips
    assert engine[quiet.name] > 0
    assert beside > 0.25 * alone, "the quiet tenant was starved"


# -- tenant move -------------------------------------------------------------------------------


def test_move_keeps_live_connections_and_moves_new_ones(
    nsm: Callable[..., str], tenant: Callable[..., Tenant], peer_ns: Callable[[], Peer]
) -> None:
    peer = peer_ns()
    first, second = nsm("mva"), nsm("mvb")
    t = tenant(uname("mover"), first)
    # A listener in the tenant (it must follow the move) and a slow, checksummed download.
    server = t.popen(
        [TENANT_PY, "-m", "http.server", "8080", "--bind", "::"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    nk("tenant", "set", t.name, "--rate-rx", "400Mbit", check=True)
    size = 200 * 1000 * 1000  # ~4 s at 400 Mbit/s
    src = peer.popen(
        [TENANT_PY, str(PROGS / "bulk.py"), "listen", peer.ipv4, "7100", "send", str(size)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert src.stdout and src.stdout.readline().strip() == "READY"
    iperf3_server(peer, 5601)
    stream = t.popen(
        ["iperf3", "-J", "-c", peer.ipv4, "-p", "5601", "-t", "6"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    dst = t.popen(
        [TENANT_PY, str(PROGS / "bulk.py"), "connect", peer.ipv4, "7100", "recv", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_port(peer, t.ipv4, 8080)
    time.sleep(1.5)
    nk("tenant", "move", t.name, "--nsm", second, check=True)

    out, err = stream.communicate(timeout=60)
    assert stream.returncode == 0, f"iperf3 across the move failed: {out[-2000:]}{err[-2000:]}"
    result = json.loads(out)
    sent = result["end"]["sum_sent"]["bytes"]
    got = result["end"]["sum_received"]["bytes"]
    got_out, got_err = dst.communicate(timeout=60)
    src_out, _ = src.communicate(timeout=60)
    assert src_out.split()[:3] == got_out.split()[:3], f"download: {src_out} vs {got_out} {got_err}"
    print(
        f"iperf3 across the move: {got / 1e9:.2f} GB received of {sent / 1e9:.2f} GB sent; "
        f"download {got_out.strip()}"
    )
    assert got > 0 and abs(sent - got) / sent < 0.02

    # New connections, in and out, land on the new NSM.
    fetch = peer.run(
        ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", f"http://{t.ipv4}:8080/"],
        capture_output=True,
        text=True,
    )
    assert fetch.stdout == "200", fetch.stderr
    iperf3_server(peer, 5602)
    late = t.popen(["iperf3", "-c", peer.ipv4, "-p", "5602", "-t", "3"], stdout=subprocess.DEVNULL)
    time.sleep(1.5)
    views = [c for c in conns(t.name) if c.get("peer", "").endswith(":5602")]
    ss_new = subprocess.run(
        ["ip", "netns", "exec", nsm_netns(second), "ss", "-tn", "dst", peer.ipv4],
        capture_output=True,
        text=True,
    ).stdout
    late.wait(timeout=30)
    assert views and {c["nsm"] for c in views} == {second}, views
    assert ":5602" in ss_new
    server.terminate()


# -- limits ------------------------------------------------------------------------------------

OPEN_UNTIL_FAIL = """
import errno, socket
s = []
try:
    while True:
        s.append(socket.socket())
except OSError as e:
    print(len(s), errno.errorcode[e.errno])
"""


def test_socket_and_memory_limits_give_linux_errnos(tenant: Callable[..., Tenant]) -> None:
    t = tenant(uname("lim"))
    nk("tenant", "set", t.name, "--max-sockets", "10", check=True)
    out = t.run([TENANT_PY, "-c", OPEN_UNTIL_FAIL], capture_output=True, text=True).stdout.split()
    assert out == ["10", "EMFILE"]
    # Each socket commits two 1 MiB rings: 8 MiB is room for four.
    nk("tenant", "set", t.name, "--max-sockets", "0", "--max-memory", "8MiB", check=True)
    out = t.run([TENANT_PY, "-c", OPEN_UNTIL_FAIL], capture_output=True, text=True).stdout.split()
    assert out == ["4", "ENOBUFS"]
    log = LOG.read_text(errors="replace")
    assert re.search(rf"event=socket_refused tenant={t.name} reason=max_sockets limit=10 errno=EMFILE", log)
    ps = {x["name"]: x for x in json.loads(nk("ps", "--json", check=True).stdout)["tenants"]}
    assert ps[t.name]["refused_sockets"] >= 1


SMALL_CONNECTIONS = """
import errno, socket
l = socket.socket()
for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):  # the accepted sockets inherit them
    l.setsockopt(socket.SOL_SOCKET, opt, 16384)
l.bind(("127.0.0.1", 0))
l.listen(512)
held = []
try:
    while True:
        c = socket.socket()
        c.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
        c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
        c.connect(l.getsockname())
        a, _ = l.accept()
        held += [c, a]
        c.sendall(b"x" * 10000)  # the rings are in use
        assert a.recv(10000, socket.MSG_WAITALL) == b"x" * 10000
except OSError as e:
    print(len(held) // 2, errno.errorcode[e.errno])
"""


def test_max_memory_counts_rings_sized_by_the_programs_buffers(tenant: Callable[..., Tenant]) -> None:
    """SO_SNDBUF and SO_RCVBUF set before a connection size its rings (16 KiB each here, not
    1 MiB), and max_memory counts them at that size (a listener's at a page each: it moves no
    bytes). 8 MiB, room for four sockets with default rings, holds 96 such connections, both
    ends in the tenant: a new socket is admitted with room for default rings (2 MiB), and each
    connection then holds 4 × 16 KiB."""
    t = tenant(uname("small"))
    nk("tenant", "set", t.name, "--max-memory", "8MiB", check=True)
    out = t.run([TENANT_PY, "-c", SMALL_CONNECTIONS], capture_output=True, text=True)
    held, err = out.stdout.split()
    assert err == "ENOBUFS" and int(held) >= 90, out


# -- visibility --------------------------------------------------------------------------------


def peer_ss(peer: Peer, remote_port: int) -> dict[str, float]:
    """rtt (µs) and bytes_received of the peer's socket whose remote port is remote_port."""
    out = peer.run(["ss", "-tinH", "dport", f"= :{remote_port}"], capture_output=True, text=True).stdout
    info: dict[str, float] = {}
    if m := re.search(r"\brtt:([\d.]+)/", out):
        info["rtt_us"] = float(m.group(1)) * 1000
    if m := re.search(r"\bbytes_received:(\d+)", out):
        info["bytes_received"] = float(m.group(1))
    assert info.keys() == {"rtt_us", "bytes_received"}, out
    return info


# Both ends of one connection send at once for argv[3] seconds: each end's RTT then holds both
# directions' queues, so the two kernels measure the same round trip.
DUPLEX = """
import socket, sys, threading, time
if sys.argv[1] == "listen":
    ls = socket.create_server(("0.0.0.0", int(sys.argv[2])))
    print("READY", flush=True)
    s, _ = ls.accept()
else:
    s = socket.create_connection((sys.argv[1], int(sys.argv[2])))
def drain():
    while s.recv(1 << 16):
        pass
reader = threading.Thread(target=drain)
reader.start()
chunk, end = b"d" * 65536, time.monotonic() + float(sys.argv[3])
while time.monotonic() < end:
    s.sendall(chunk)
s.shutdown(socket.SHUT_WR)
reader.join()
"""


def test_conns_agree_with_the_peers_view(
    tenant: Callable[..., Tenant], peer_ns: Callable[[], Peer], nsm: Callable[..., str]
) -> None:
    """RTT and bytes from `netkernel conns` (the NSM's TCP_INFO, the engine's counters) against
    what the remote host's kernel says about the same connection. A 100 Mbit/s bottleneck each
    way, with data both ways, makes the round trip milliseconds of queueing, which both ends
    see alike (this kernel has no netem for a plain delay). Receive buffers on both sides cap
    what is in flight below what the bottleneck queues hold: the queues stay at one window
    instead of swinging through loss and recovery, so the RTT holds still while it is sampled."""
    peer = peer_ns()
    rmem = "net.ipv4.tcp_rmem=4096 131072 131072"
    n = nsm("vis", "--sysctl", rmem)
    subprocess.run(["ip", "netns", "exec", peer.name, "sysctl", "-qw", rmem], check=True)
    for ns in (nsm_netns(n), peer.name):
        subprocess.run(
            [
                "ip",
                "netns",
                "exec",
                ns,
                "tc",
                "qdisc",
                "add",
                "dev",
                "eth0",
                "root",
                "tbf",
                "rate",
                "100mbit",
                "burst",
                "64kb",
                "latency",
                "20ms",
            ],
            check=True,
        )
    t = tenant(uname("vis"), n)
    server = peer.popen([TENANT_PY, "-c", DUPLEX, "listen", "5701", "11"], stdout=subprocess.PIPE, text=True)
    assert server.stdout and server.stdout.readline().strip() == "READY"
    client = t.popen([TENANT_PY, "-c", DUPLEX, peer.ipv4, "5701", "11"])
    time.sleep(3)
    # The smoothed RTT moves with the queues: compare the means of samples taken side by side.
    ours_rtt, theirs_rtt = [], []
    for _ in range(20):
        ours = [c for c in conns(t.name) if c.get("peer", "").endswith(":5701")]
        assert len(ours) == 1, conns(t.name)
        c = ours[0]
        theirs = peer_ss(peer, int(c["local"].rsplit(":", 1)[1]))
        ours_rtt.append(c["rtt_us"])
        theirs_rtt.append(theirs["rtt_us"])
        time.sleep(0.2)
    assert client.wait(timeout=30) == 0 and server.wait(timeout=30) == 0
    rtt, peer_rtt = sum(ours_rtt) / len(ours_rtt), sum(theirs_rtt) / len(theirs_rtt)
    print(
        f"conns: rtt {rtt:.0f} µs, tx {c['tx_bytes']} B; peer: rtt {peer_rtt:.0f} µs, "
        f"received {theirs['bytes_received']:.0f} B"
    )
    # Bytes: the engine counts what it handed to the NSM socket; the peer what it received.
    # Taken a few ms apart at 100 Mbit/s, and the NSM socket still holds unsent bytes.
    assert c["tx_bytes"] > 10e6
    assert abs(c["tx_bytes"] - theirs["bytes_received"]) / theirs["bytes_received"] < 0.10
    assert abs(rtt - peer_rtt) / peer_rtt < 0.10
