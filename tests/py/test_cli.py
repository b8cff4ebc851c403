"""Control-plane tests: CLI, daemon, fabric, DNS responder, engine admin client.

None of these needs the C data path to carry traffic; the ones marked with nk_daemon need
root and the installed engine.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import socketserver
import struct
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import NETKERNEL, TENANT_PY, Daemon, nk, requires_root, wait_port
from prometheus_client.parser import text_string_to_metric_families

from netkernel import cli, config, dns
from netkernel.config import LOG_FILE as LOG
from netkernel.config import Config
from netkernel.engine import EngineClient, parse_conns, parse_stats
from netkernel.errors import EngineError, NetKernelError
from netkernel.sandbox import GUESTLIB_DIR, tenant_env


def netns_names() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def link_names() -> list[str]:
    out = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    return [line.split(":")[1].strip().split("@")[0] for line in out.splitlines()]


# -- no daemon needed -----------------------------------------------------------------------


def test_not_root_message(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 65534)
    assert cli.main(["up"]) == 1
    err = capsys.readouterr().err
    assert err.strip() == "netkernel: must run as root (try sudo)"


@requires_root
def test_not_root_message_real_user() -> None:
    cmd = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    probe = subprocess.run(cmd + [sys.executable, "-c", "import netkernel"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip("nobody cannot run this Python/package (e.g. it lives under /root)")
    proc = subprocess.run(cmd + NETKERNEL + ["up"], capture_output=True, text=True)
    assert proc.returncode == 1
    assert "must run as root (try sudo)" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_daemon_not_running(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("NETKERNEL_API_SOCKET", str(tmp_path / "nothing.sock"))
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert cli.main(["run", "--tenant", "x", "--", "true"]) == 1
    assert (
        capsys.readouterr().err.strip()
        == "netkernel: the daemon is not running (start it with: netkernel up)"
    )
    assert cli.main(["status"]) == cli.EXIT_NOT_RUNNING
    assert cli.main(["status", "--json"]) == cli.EXIT_NOT_RUNNING
    assert json.loads(capsys.readouterr().out.splitlines()[-1]) == {"running": False}


def test_command_not_found_before_daemon(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Checked before talking to the daemon: exit 127 even when it is not running.
    monkeypatch.setenv("NETKERNEL_API_SOCKET", str(tmp_path / "nothing.sock"))
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert cli.main(["run", "--tenant", "x", "--", "ls"]) == 127
    assert capsys.readouterr().err.strip() == "netkernel: ls: command not found"


def test_run_without_command_is_usage_error() -> None:
    with pytest.raises(SystemExit) as e:
        cli.main(["run", "--tenant", "x"])
    assert e.value.code == 2


def test_config_default_addresses() -> None:
    c = Config()
    assert str(c.bridge_ipv4) == "198.18.0.1" and str(c.bridge_ipv6) == "fd6e:6b00::1"
    assert str(c.nsm_ipv4(0)) == "198.18.0.2" and str(c.nsm_ipv6(0)) == "fd6e:6b00::2"
    assert str(c.tenant_ipv4(1)) == "198.18.1.1" and str(c.tenant_ipv6(1)) == "fd6e:6b00::1:1"
    assert [n.name for n in c.nsms] == ["kernel"]


def test_tenant_env_prepends_guestlib() -> None:
    lib = f"{GUESTLIB_DIR}/libnetkernel.so"  # where the sandbox shows GuestLib
    env = tenant_env({"LD_PRELOAD": "/x/other.so", "A": "1"}, "web")
    assert env["LD_PRELOAD"] == f"{lib}:/x/other.so"
    assert env["NETKERNEL_TENANT"] == "web"
    assert env["NETKERNEL_SOCKET"] == "/run/netkernel/engine.sock"
    assert env["TMPDIR"] == "/var/tmp"  # /tmp is the host's, read-only
    assert tenant_env({}, "w")["LD_PRELOAD"] == lib
    assert tenant_env({"TMPDIR": "/mine"}, "w")["TMPDIR"] == "/mine"


# -- DNS responder --------------------------------------------------------------------------


def test_dns_responder(tmp_path: Path) -> None:
    hosts = dns.HostsFile(tmp_path / "hosts")
    (tmp_path / "hosts").write_text("127.0.0.1 localhost\n198.19.3.1 Peer.Example peer # c\n")
    import ipaddress

    table = {
        "web.tenant.netkernel": [ipaddress.ip_address("198.18.1.1"), ipaddress.ip_address("fd6e:6b00::1:1")]
    }

    def resolve(name: str) -> dns.Addrs | None:
        return table.get(name) or hosts.lookup(name)

    server = dns.DNSServer("127.0.0.1", 0, resolve)
    server.start()
    c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    c.settimeout(2)

    def ask(query: bytes) -> bytes:
        c.sendto(query, server.address)
        return c.recv(512)

    try:
        assert dns.parse_answers(ask(dns.make_query("web.tenant.netkernel", dns.QTYPE_A))) == (
            0,
            ["198.18.1.1"],
        )
        assert dns.parse_answers(ask(dns.make_query("WEB.tenant.netkernel.", dns.QTYPE_AAAA))) == (
            0,
            ["fd6e:6b00::1:1"],
        )
        assert dns.parse_answers(ask(dns.make_query("peer.example", dns.QTYPE_A))) == (0, ["198.19.3.1"])
        # Known name, no AAAA: NOERROR with no answer (NODATA), not NXDOMAIN.
        assert dns.parse_answers(ask(dns.make_query("peer", dns.QTYPE_AAAA))) == (0, [])
        reply = ask(dns.make_query("nope.example", dns.QTYPE_A, qid=0xBEEF))
        assert reply[:2] == b"\xbe\xef"
        assert dns.parse_answers(reply) == (dns.RCODE_NXDOMAIN, [])
        # Garbage gets FORMERR, and the responder keeps serving.
        assert dns.parse_answers(ask(b"\x00\x01\x00\x00" + b"\x00" * 8))[0] == dns.RCODE_FORMERR
        assert dns.parse_answers(ask(dns.make_query("localhost", dns.QTYPE_A))) == (0, ["127.0.0.1"])
    finally:
        c.close()
        server.stop()


def test_dns_forwarded_zones_do_not_hold_up_local_names() -> None:
    """Names another host answers ([dns] forward) are asked by worker threads: a host that does
    not answer delays only those, and at most MAX_FORWARDS wait."""
    import ipaddress

    release = threading.Event()

    def resolve(name: str) -> dns.Addrs | None:
        if name.endswith(".h3.lab"):
            release.wait(5)  # the other host is slow
            return [ipaddress.ip_address("198.18.49.1")]
        return [ipaddress.ip_address("198.18.17.1")] if name == "a.h1.lab" else None

    server = dns.DNSServer("127.0.0.1", 0, resolve, slow=lambda n: n.endswith(".h3.lab"))
    server.start()
    c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    c.settimeout(2)
    try:
        for i in range(dns.MAX_FORWARDS + 10):
            c.sendto(dns.make_query(f"n{i}.h3.lab", dns.QTYPE_A, qid=i), server.address)
        c.sendto(dns.make_query("a.h1.lab", dns.QTYPE_A, qid=0xF00D), server.address)
        reply = c.recv(512)  # the local name first, while every forward waits
        assert reply[:2] == b"\xf0\x0d" and dns.parse_answers(reply) == (0, ["198.18.17.1"])
        release.set()
        answered = set()
        while len(answered) < dns.MAX_FORWARDS:
            answered.add(struct.unpack_from("!H", c.recv(512))[0])
        assert server.forwards_dropped == 10
    finally:
        release.set()
        server.stop()
        c.close()


# -- engine admin client against a fake admin server -----------------------------------------

# Stats lines as the engine writes them (csrc/engine/admin.c), every key there.
TENANT_LINE = (
    "tenant web id=1 nsm=kernel sockets=3 tx_bytes=100 rx_bytes=200 memory=6291456 "
    "rate_tx=200000000 rate_rx=0 weight=2 max_sockets=100 max_memory=0 refused_sockets=1 "
    "refused_memory=0 slots=1024 engine_ns=5000 engine_skips=0 shm=1 fds=4 fd_limit=512 ctls=1 "
    "dns_relayed=2 dns_dropped=0 region_bytes=65536 region_trimmed=0 rings_shrunk=0 "
    "throttle_wakes=0 "
    "throttle_late_ns=0 rate_late_credit=0 tenant_cc=0 cc_rate=0 cc_sent=0 cc_qdelay_us=0 cc_flows=0 "
    "cc_retrans=0 cc_cuts=0"
)
NSM_LINE = "nsm kernel type=kernel tenants=1 sockets=3 tx_bytes=100 rx_bytes=200 bandwidth=0 up=1 connects=0"


class _FakeAdmin(socketserver.StreamRequestHandler):
    replies = {
        "stats": f"{TENANT_LINE}\n{NSM_LINE}\nok\n",
        "conns": "conn tenant=web slot=4 kind=stream state=connected nsm=kernel proto=tcp "
        "local=198.18.1.1:80 peer=198.19.1.1:5555 tx_bytes=7 rx_bytes=9 tx_queued=0 rx_queued=0 "
        "tcp_state=established rtt_us=120 rttvar_us=30 cwnd=10 retrans=0 total_retrans=2 "
        "delivery_rate=125000 pacing_rate=250000 ca=cubic\n"
        "conn tenant=web slot=5 kind=dgram state=bound nsm=kernel proto=udp "
        "local=198.18.1.1:53 peer=0.0.0.0:0 tx_bytes=0 rx_bytes=0 future_key=x\nok\n",
        "conns db": "ok\n",
        "tenant-add web /run/netns/nk-t-web kernel 198.18.1.1 fd6e:6b00::1:1": "ok 7\n",
        "tenant-del ghost": "err ENOENT no such tenant\n",
        "nsm-del kernel": "err EBUSY nsm kernel still has tenants or connections\n",
        "tenant-set web weight=0": "err EINVAL weight must be 1..1000\n",
    }

    def handle(self) -> None:
        for line in self.rfile:
            self.wfile.write(self.replies.get(line.decode().strip(), "ok\n").encode())


@pytest.fixture
def fake_admin(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "admin.sock"
    server = socketserver.ThreadingUnixStreamServer(str(path), _FakeAdmin)
    server.daemon_threads = True
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    yield path
    server.shutdown()
    server.server_close()


def test_engine_client_parsing(fake_admin: Path) -> None:
    c = EngineClient(fake_admin)
    try:
        # Many requests on one connection.
        c.nsm_add("kernel", "/run/netns/nk-nsm-kernel")
        assert c.tenant_add("web", "/run/netns/nk-t-web", "kernel", "198.18.1.1", "fd6e:6b00::1:1") == 7
        stats = c.stats()
        (web,) = stats.tenants
        assert (web.name, web.id, web.sockets, web.tx_bytes, web.rx_bytes, web.memory) == (
            "web",
            1,
            3,
            100,
            200,
            6 << 20,
        )
        assert (web.rate_tx, web.rate_rx, web.weight, web.max_sockets, web.refused_sockets) == (
            200_000_000,
            0,
            2,
            100,
            1,
        )
        assert (web.engine_ns, web.fd_limit, web.region_bytes) == (5000, 512, 65536)
        kernel = stats.nsm("kernel")
        assert kernel is not None and (kernel.tenants, kernel.sockets, kernel.bandwidth, kernel.up) == (
            1,
            3,
            0,
            1,
        )
        tcp, udp = c.conns()
        assert (tcp.tenant, tcp.slot, tcp.kind, tcp.state, tcp.nsm, tcp.proto, tcp.local, tcp.peer) == (
            "web",
            4,
            "stream",
            "connected",
            "kernel",
            "tcp",
            "198.18.1.1:80",
            "198.19.1.1:5555",
        )
        assert (tcp.rtt_us, tcp.cwnd, tcp.total_retrans, tcp.delivery_rate, tcp.ca) == (
            120,
            10,
            2,
            125000,
            "cubic",
        )
        assert (udp.proto, udp.rtt_us, udp.ca) == ("udp", None, None)
        assert c.conns("db") == []
        with pytest.raises(EngineError) as e:
            c.tenant_del("ghost")
        assert e.value.errno_name == "ENOENT" and e.value.engine_message == "no such tenant"
        with pytest.raises(EngineError) as e:
            c.nsm_del("kernel")
        assert e.value.errno_name == "EBUSY"
        with pytest.raises(EngineError, match="weight must be 1..1000"):
            c.tenant_set("web", "weight=0")
        c.nsm_set("kernel", 500_000_000)
        c.tenant_move("web", "alt")
        c.dns_upstream("198.18.0.1", 53)  # the connection survives err replies
    finally:
        c.close()


def test_parse_ignores_unknown_lines() -> None:
    stats = parse_stats(["future thing", TENANT_LINE + " x=y", NSM_LINE])
    assert stats.tenants[0].rx_bytes == 200 and stats.nsms[0].connects == 0
    assert (
        parse_conns(
            ["conn tenant=a slot=1 kind=dgram state=OPEN local=x:1 peer=y:2 tx_bytes=0 rx_bytes=0 rtt_us=5"]
        )[0].kind
        == "dgram"
    )


@pytest.mark.parametrize(
    "line",
    [
        TENANT_LINE.replace(" engine_ns=5000", ""),
        TENANT_LINE.replace("engine_ns=5000", "engine_ns=x"),
        NSM_LINE.replace(" connects=0", ""),
    ],
)
def test_parse_refuses_stats_of_another_engine_build(line: str) -> None:
    # The engine ships with the package: a key it lacks is a mismatch to say, not a gap.
    key = "engine_ns" if line.startswith("tenant") else "connects"
    with pytest.raises(NetKernelError, match=f"no valid {key}=.*not from this package's build"):
        parse_stats([line])


# -- with the daemon ---------------------------------------------------------------------------


def test_up_twice_says_already_running(nk_daemon: Daemon) -> None:
    proc = nk("up")
    assert proc.returncode == 1
    assert "already running" in proc.stderr and "Traceback" not in proc.stderr


def test_status(nk_daemon: Daemon) -> None:
    st = nk_daemon.status()
    assert st["running"] is True and st["pid"] > 0
    assert [n["name"] for n in st["nsms"]] == ["kernel"]
    assert "running" in nk("status", check=True).stdout


def test_unknown_nsm(nk_daemon: Daemon) -> None:
    proc = nk("run", "--tenant", "t-unknown-nsm", "--nsm", "nosuch", "--", "true")
    assert proc.returncode == 1
    assert proc.stderr.strip() == "netkernel: unknown NSM 'nosuch' (configured: kernel)"
    assert "nk-t-t-unknown-nsm" not in netns_names()


def test_command_not_found_creates_nothing(nk_daemon: Daemon) -> None:
    proc = nk("run", "--tenant", "t-notfound", "--", "definitely-not-a-command-xyz")
    assert proc.returncode == 127
    assert proc.stderr.strip() == "netkernel: definitely-not-a-command-xyz: command not found"
    assert all(t["name"] != "t-notfound" for t in nk_daemon.ps())
    assert "nk-t-t-notfound" not in netns_names()


def test_bad_config_is_clear(nk_daemon: Daemon, tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[[nsm]]\nname = 3 4\n")
    proc = nk("up", "--config", str(bad))
    assert proc.returncode == 1
    assert proc.stderr.startswith(f"netkernel: config file {bad}: invalid TOML")
    assert "Traceback" not in proc.stderr


def test_tenant_netns_has_only_lo_and_nsm_has_its_addresses(nk_daemon: Daemon, tenant) -> None:  # type: ignore[no-untyped-def]
    t = tenant("t-lo")
    out = subprocess.run(
        ["ip", "-n", f"nk-t-{t.name}", "-o", "link"], capture_output=True, text=True, check=True
    ).stdout
    assert [line.split(":")[1].strip() for line in out.splitlines()] == ["lo"]
    assert "state UNKNOWN" in out or "LOWER_UP" in out  # lo is up
    addrs = subprocess.run(
        ["ip", "-n", "nk-nsm-kernel", "-o", "addr", "show", "dev", "eth0"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert f"{t.ipv4}/32" in addrs and f"{t.ipv6}/128" in addrs
    # No route off the machine from the NSM.
    routes = subprocess.run(
        ["ip", "-n", "nk-nsm-kernel", "route", "show", "default"], capture_output=True, text=True
    ).stdout
    assert routes.strip() == ""


def test_ps_json_shape(nk_daemon: Daemon, tenant) -> None:  # type: ignore[no-untyped-def]
    t = tenant("t-ps")
    proc = subprocess.Popen(NETKERNEL + ["run", "--tenant", "t-ps", "--", "sleep", "30"])
    try:
        import time

        deadline = time.monotonic() + 10
        while True:
            info = nk_daemon.tenant_info("t-ps")
            if info["pids"] or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        doc = json.loads(nk("ps", "--json", check=True).stdout)
        assert set(doc) == {"tenants"}
        info = next(x for x in doc["tenants"] if x["name"] == "t-ps")
        assert {
            "name",
            "nsm",
            "ipv4",
            "ipv6",
            "pids",
            "sockets",
            "memory",
            "tx_bytes",
            "rx_bytes",
            "tx_bps",
            "rx_bps",
            "policy",
            "draining",
        } <= set(info)
        assert info["policy"] == {
            "rate_tx": 0,
            "rate_rx": 0,
            "weight": 1,
            "max_sockets": config.ENGINE_SLOTS,
            "max_memory": 0,
            "shm": True,
            "tenant_cc": False,
            "max_process_memory": 4 << 30,
            "max_processes": 4096,
        }
        assert info["nsm"] == "kernel" and info["ipv4"] == t.ipv4 and info["ipv6"] == t.ipv6
        assert info["ipv4"].startswith("198.18.1.") and info["ipv6"].startswith("fd6e:6b00::1:")
        assert len(info["pids"]) == 1
        table = nk("ps", check=True).stdout.splitlines()
        assert table[0].split() == cli.PS_HEADERS
    finally:
        proc.terminate()
        assert proc.wait(10) == 128 + 15  # SIGTERM forwarded; status is 128+signal


def test_run_exit_status(nk_daemon: Daemon, tenant) -> None:  # type: ignore[no-untyped-def]
    t = tenant("t-exit")
    assert t.run(["sh", "-c", "exit 7"]).returncode == 7
    assert t.run(["sh", "-c", "kill -9 $$"]).returncode == 137
    out = t.run(["cat", "/etc/resolv.conf"], capture_output=True, text=True).stdout
    assert out == "nameserver 127.0.0.53\n"
    caps = t.run(["grep", "CapBnd", "/proc/self/status"], capture_output=True, text=True).stdout
    bnd = int(caps.split()[1], 16)
    assert not bnd & (1 << 21) and not bnd & (1 << 12)  # no SYS_ADMIN, no NET_ADMIN
    assert bnd & (1 << 10) and bnd & (1 << 7)  # NET_BIND_SERVICE, SETUID kept


def fabric() -> tuple[list[str], list[str], bool]:
    """What a daemon leaves on the host: our namespaces, our links, its API socket."""
    return (
        [n for n in netns_names() if n.startswith("nk-")],
        [n for n in link_names() if n == "nk0" or n.startswith("nkn-")],
        Path("/run/netkernel/daemon.sock").exists(),
    )


NOTHING: tuple[list[str], list[str], bool] = ([], [], False)

OPERATOR_CONFIG = """\
[daemon]
metrics_listen = "127.0.0.1:19464"
log_format = "json"

[defaults]
max_sockets = 64

[[nsm]]
name = "kernel"
congestion_control = "reno"

[[nsm]]
name = "alt"
congestion_control = "bbr"
bandwidth = "500Mbit"
[nsm.sysctl]
"net.core.somaxconn" = 512

[[tenant]]
name = "t-cfg"
nsm = "alt"
rate_tx = "200Mbit"
weight = 2
max_memory = "512MiB"
shm = false
"""


def nk_json(*args: str) -> dict[str, Any]:
    return dict(json.loads(nk(*args, "--json", check=True).stdout))


def ns_sysctl(ns: str, key: str) -> str:
    return subprocess.run(
        ["ip", "netns", "exec", ns, "sysctl", "-n", key], capture_output=True, text=True, check=True
    ).stdout.strip()


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def check_bad_configs_change_nothing(tmp_path: Path) -> None:
    """With no daemon running: each bad config is refused with file, line, key and reason, and
    leaves no namespace, link or daemon behind."""
    bad = tmp_path / "bad.toml"
    for text, start, words in [
        (
            '[[nsm]]\nname = "kernel"\ncongestion_control = "vegas"\n',
            f"netkernel: config file {bad}, line 3: nsm[0].congestion_control: 'vegas' is not offered",
            ["reno", "bbr"],
        ),
        (
            '[[tenant]]\nname = "web"\nrate_tx = "20 0Mbit"\n',
            f"netkernel: config file {bad}, line 3: tenant[0].rate_tx: '20 0Mbit' is not a rate",
            ["200Mbit"],
        ),
        (
            '[daemon]\napi_group = "nk-no-such-group"\n',
            f"netkernel: config file {bad}, line 2: daemon.api_group: no group 'nk-no-such-group'",
            [],
        ),
        ("[[nsm]]\nname = 3 4\n", f"netkernel: config file {bad}: invalid TOML", ["line 2"]),
    ]:
        bad.write_text(text)
        proc = nk("up", "--config", str(bad))
        assert proc.returncode == 1, proc.stdout + proc.stderr
        assert proc.stderr.startswith(start), proc.stderr
        assert all(w in proc.stderr for w in words) and "Traceback" not in proc.stderr, proc.stderr
        assert fabric() == NOTHING
    # Valid TOML the kernel refuses at start-up (this sysctl is host-wide, absent in a
    # namespace): the daemon never runs half-configured, it removes everything and `up` says why.
    bad.write_text('[[nsm]]\nname = "kernel"\n[nsm.sysctl]\n"net.core.netdev_max_backlog" = 2000\n')
    proc = nk("up", "--config", str(bad))
    assert proc.returncode == 1
    assert "net.core.netdev_max_backlog" in proc.stderr and "host-wide" in proc.stderr, proc.stderr
    assert fabric() == NOTHING


@requires_root
def test_operator_control(nk_daemon: Daemon, tmp_path: Path, peer_ns) -> None:  # type: ignore[no-untyped-def]
    """One daemon with a config file: NSMs with their own sysctls, a tenant with policy from
    the config, then the operator's commands, the JSON log, the metrics endpoint and `down`.
    The session's default daemon is restored afterwards."""
    nk_daemon.down()
    try:
        check_bad_configs_change_nothing(tmp_path)
        cfg = tmp_path / "netkernel.toml"
        cfg.write_text(OPERATOR_CONFIG)
        log_offset = LOG.stat().st_size if LOG.exists() else 0
        nk_daemon.up("--config", str(cfg))

        status = nk_json("status")
        assert [(n["name"], n["congestion_control"], n["bandwidth"]) for n in status["nsms"]] == [
            ("kernel", "reno", 0),
            ("alt", "bbr", 500_000_000),
        ]
        assert status["metrics"] == "http://127.0.0.1:19464/metrics"
        assert ns_sysctl("nk-nsm-kernel", "net.ipv4.tcp_congestion_control") == "reno"
        assert ns_sysctl("nk-nsm-alt", "net.ipv4.tcp_congestion_control") == "bbr"
        assert ns_sysctl("nk-nsm-alt", "net.core.somaxconn") == "512"
        for ns in ("nk-nsm-kernel", "nk-nsm-alt"):
            assert ns_sysctl(ns, "net.ipv4.conf.all.arp_announce") == "2"

        (cfg_tenant,) = nk_json("ps")["tenants"]
        assert (cfg_tenant["name"], cfg_tenant["nsm"]) == ("t-cfg", "alt")
        assert cfg_tenant["policy"] == {
            "rate_tx": 200_000_000,
            "rate_rx": 0,
            "weight": 2,
            "max_sockets": 64,
            "max_memory": 512 << 20,
            "shm": False,
            "tenant_cc": False,
            "max_process_memory": 4 << 30,
            "max_processes": 4096,
        }

        # Policy at creation ([defaults] below the options) and live changes.
        proc = nk("tenant", "create", "t-op", "--rate", "100Mbit", check=True)
        assert "tenant t-op created: nsm kernel" in proc.stdout
        proc = nk("tenant", "set", "t-op", "--weight", "5", "--max-sockets", "5000", check=True)
        assert proc.stdout.strip() == (
            "tenant t-op: rate_tx=100Mbit rate_rx=100Mbit weight=5 "
            "max_sockets=5000 max_memory=unlimited shm=on tenant_cc=off "
            "max_process_memory=4GiB max_processes=4096"
        )

        # Bad input: a clear error and nothing changes.
        def tenants() -> dict[str, tuple[str, dict[str, int]]]:
            return {t["name"]: (t["nsm"], t["policy"]) for t in nk_json("ps")["tenants"]}

        before = tenants()
        for args, code, message in [
            (["tenant", "set", "t-op", "--rate-tx", "20 0Mbit"], 2, "'20 0Mbit' is not a rate"),
            (["tenant", "set", "nosuch", "--weight", "2"], 1, "no tenant named 'nosuch'"),
            (["tenant", "create", "t-op", "--nsm", "alt"], 1, "move it with: netkernel tenant move t-op"),
            (
                ["tenant", "create", "t-x", "--nsm", "nosuch"],
                1,
                "unknown NSM 'nosuch' (configured: kernel, alt)",
            ),
            (["tenant", "move", "t-op", "--nsm", "nosuch"], 1, "unknown NSM 'nosuch'"),
            (["nsm", "remove", "kernel"], 1, "NSM 'kernel' still serves tenant(s) t-op"),
            (["nsm", "add", "alt"], 1, "NSM 'alt' exists already"),
            (["nsm", "add", "bad", "--sysctl", "net.core.netdev_max_backlog=2000"], 1, "host-wide"),
        ]:
            proc = nk(*args)
            assert proc.returncode == code, (args, proc.stderr)
            assert message in proc.stderr and "Traceback" not in proc.stderr, (args, proc.stderr)
        assert tenants() == before
        assert not {"nk-t-t-x", "nk-nsm-bad"} & set(netns_names())

        # An NSM at run time, a tenant moved onto it, the emptied NSM removed.
        nk(
            "nsm",
            "add",
            "third",
            "--congestion-control",
            "cubic",
            "--sysctl",
            "net.core.somaxconn=128",
            check=True,
        )
        assert ns_sysctl("nk-nsm-third", "net.ipv4.tcp_congestion_control") == "cubic"
        assert ns_sysctl("nk-nsm-third", "net.core.somaxconn") == "128"
        third = next(n for n in nk_json("nsm", "list")["nsms"] if n["name"] == "third")
        assert third["ipv4"] == "198.18.0.4" and third["tenants"] == [] and third["sockets"] == 0
        proc = nk("tenant", "move", "t-op", "--nsm", "third", check=True)
        assert "tenant t-op moved to NSM third" in proc.stdout
        t_op = next(t for t in nk_json("ps")["tenants"] if t["name"] == "t-op")
        assert t_op["nsm"] == "third"
        addrs = subprocess.run(
            ["ip", "-n", "nk-nsm-third", "-o", "addr", "show", "dev", "eth0"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert f"{t_op['ipv4']}/32" in addrs and f"{t_op['ipv6']}/128" in addrs
        # No connection was open on the old NSM: the drain check frees it within a round or two.
        deadline = time.monotonic() + 15
        while nk("nsm", "remove", "kernel").returncode != 0:
            assert time.monotonic() < deadline, nk("nsm", "remove", "kernel").stderr
            time.sleep(0.5)
        assert [n["name"] for n in nk_json("nsm", "list")["nsms"]] == ["alt", "third"]
        assert "nk-nsm-kernel" not in netns_names()

        # Traffic makes the counters grow: the tenant sends 1 MiB to a peer.
        peer = peer_ns()
        sink = peer.popen([sys.executable, "-c", SINK], stdout=subprocess.PIPE, text=True)
        wait_port(peer, peer.ipv4, 9300)
        port = 19464
        before_scrape = scrape(port)
        labels = (("nsm", "third"), ("tenant", "t-op"))
        assert before_scrape[("netkernel_up", ())] == 1
        assert before_scrape[("netkernel_tenant_weight", labels)] == 5
        assert before_scrape[("netkernel_tenant_rate_limit_tx_bps", labels)] == 100_000_000
        proc = subprocess.run(
            NETKERNEL + ["run", "--tenant", "t-op", "--", TENANT_PY, "-c", SOURCE.format(host=peer.ipv4)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 0, proc.stderr
        assert sink.communicate(timeout=30)[0].strip() == str(1 << 20)
        after = scrape(port)
        assert after[("netkernel_tenant_tx_bytes_total", labels)] >= before_scrape.get(
            ("netkernel_tenant_tx_bytes_total", labels), 0
        ) + (1 << 20)
        assert after[("netkernel_nsm_tx_bytes_total", (("nsm", "third"),))] >= 1 << 20

        doc = nk_json("conns", "--tenant", "t-op")
        assert set(doc) == {"conns"}
        lines = nk("top", "--json", "--iterations", "2", "--interval", "0.2", check=True).stdout.splitlines()
        assert len(lines) == 2 and {t["name"] for t in json.loads(lines[-1])["tenants"]} == {"t-cfg", "t-op"}

        # log_format = "json": the daemon's events and the engine's, one JSON object per line.
        with open(LOG, "rb") as f:
            f.seek(log_offset)
            records = [json.loads(line) for line in f.read().decode().splitlines() if line.startswith("{")]
        events = {(r.get("event"), r.get("tenant")) for r in records}
        assert {
            ("tenant_created", "t-cfg"),
            ("tenant_policy_set", "t-op"),
            ("tenant_moved", "t-op"),
            ("tenant_drained", "t-op"),
        } <= events
        assert any(r["logger"] == "netkernel.engine" and r.get("event") == "policy_set" for r in records)

        proc = nk("down", check=True)
        assert "down" in proc.stdout
        assert fabric() == NOTHING
        if shutil.which("nft"):
            tables = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True).stdout
            assert "netkernel_nk0" not in tables
        # Idempotent, with a clear message.
        assert "not running" in nk("down", check=True).stdout
    finally:
        nk("down")
        nk_daemon.up()


# Counts the bytes of the first connection that sends any (the readiness probe sends none).
SINK = """\
import socket
s = socket.create_server(("0.0.0.0", 9300))
n = 0
while n == 0:
    c, _ = s.accept()
    while chunk := c.recv(65536):
        n += len(chunk)
print(n)
"""
SOURCE = """\
import socket
with socket.create_connection(("{host}", 9300), timeout=30) as s:
    s.sendall(b"x" * (1 << 20))
"""
