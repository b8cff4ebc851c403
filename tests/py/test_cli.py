"""Control-plane tests: CLI, daemon, fabric, DNS responder, engine admin client.

None of these needs the C data path to carry traffic; the ones marked with nk_daemon need
root and the installed engine.
"""

from __future__ import annotations

import json
import os
import socket
import socketserver
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import NETKERNEL, Daemon, nk, requires_root

from netkernel import api, cli, dns
from netkernel.config import Config, load_config
from netkernel.engine import EngineClient, parse_conns, parse_stats
from netkernel.errors import ConfigError, EngineError
from netkernel.tenant import tenant_env


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


def test_daemon_not_running(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                            capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(api, "DAEMON_SOCKET", tmp_path / "nothing.sock")
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert cli.main(["run", "--tenant", "x", "--", "true"]) == 1
    assert capsys.readouterr().err.strip() == \
        "netkernel: the daemon is not running (start it with: netkernel up)"
    assert cli.main(["status"]) == cli.EXIT_NOT_RUNNING
    assert cli.main(["status", "--json"]) == cli.EXIT_NOT_RUNNING
    assert json.loads(capsys.readouterr().out.splitlines()[-1]) == {"running": False}


def test_command_not_found_before_daemon(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    # Checked before talking to the daemon: exit 127 even when it is not running.
    monkeypatch.setattr(api, "DAEMON_SOCKET", tmp_path / "nothing.sock")
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


def test_config_parse_errors_are_clear(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[network\nipv4_subnet = 1\n")
    with pytest.raises(ConfigError, match=r"bad.toml: invalid TOML"):
        load_config(bad)
    bad.write_text('[network]\nipv4_subnet = "not-a-net"\n')
    with pytest.raises(ConfigError, match=r"bad.toml: \[network\]"):
        load_config(bad)
    bad.write_text('[[nsm]]\nname = "Kernel!"\n')
    with pytest.raises(ConfigError, match="invalid NSM name"):
        load_config(bad)
    bad.write_text('[oops]\n')
    with pytest.raises(ConfigError, match="unknown section"):
        load_config(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.toml")
    good = tmp_path / "good.toml"
    good.write_text('[[nsm]]\nname = "kernel"\n[[nsm]]\nname = "alt"\n'
                    '[dns]\nhosts = { "db.example" = "198.19.9.1" }\n')
    c = load_config(good)
    assert [n.name for n in c.nsms] == ["kernel", "alt"]
    assert c.dns_hosts == (("db.example", "198.19.9.1"),)


def test_tenant_env_prepends_guestlib() -> None:
    env = tenant_env({"LD_PRELOAD": "/x/other.so", "A": "1"}, "web", Path("/lib/libnetkernel.so"))
    assert env["LD_PRELOAD"] == "/lib/libnetkernel.so:/x/other.so"
    assert env["NETKERNEL_TENANT"] == "web"
    assert env["NETKERNEL_SOCKET"] == "/run/netkernel/engine.sock"
    assert tenant_env({}, "w", Path("/l.so"))["LD_PRELOAD"] == "/l.so"


# -- DNS responder --------------------------------------------------------------------------

def test_dns_responder(tmp_path: Path) -> None:
    hosts = dns.HostsFile(tmp_path / "hosts")
    (tmp_path / "hosts").write_text("127.0.0.1 localhost\n198.19.3.1 Peer.Example peer # c\n")
    import ipaddress
    table = {"web.tenant.netkernel": [ipaddress.ip_address("198.18.1.1"),
                                      ipaddress.ip_address("fd6e:6b00::1:1")]}

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
        assert dns.parse_answers(ask(dns.make_query("web.tenant.netkernel", dns.QTYPE_A))) \
            == (0, ["198.18.1.1"])
        assert dns.parse_answers(ask(dns.make_query("WEB.tenant.netkernel.", dns.QTYPE_AAAA))) \
            == (0, ["fd6e:6b00::1:1"])
        assert dns.parse_answers(ask(dns.make_query("peer.example", dns.QTYPE_A))) \
            == (0, ["198.19.3.1"])
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


# -- engine admin client against a fake admin server -----------------------------------------

class _FakeAdmin(socketserver.StreamRequestHandler):
    replies = {
        "stats": "tenant web id=1 nsm=kernel sockets=3 tx_bytes=100 rx_bytes=200\n"
                 "tenant db id=2 nsm=kernel sockets=0 tx_bytes=0 rx_bytes=0\nok\n",
        "conns": "conn tenant=web slot=4 kind=stream state=ESTABLISHED local=198.18.1.1:80 "
                 "peer=198.19.1.1:5555 tx_bytes=7 rx_bytes=9\nok\n",
        "tenant-add web /run/netns/nk-t-web kernel 198.18.1.1 fd6e:6b00::1:1": "ok 7\n",
        "tenant-del ghost": "err ENOENT no such tenant\n",
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
        assert c.tenant_add("web", "/run/netns/nk-t-web", "kernel", "198.18.1.1",
                            "fd6e:6b00::1:1") == 7
        stats = c.stats()
        assert [(s.name, s.id, s.sockets, s.tx_bytes, s.rx_bytes) for s in stats] == \
            [("web", 1, 3, 100, 200), ("db", 2, 0, 0, 0)]
        (conn,) = c.conns()
        assert (conn.tenant, conn.slot, conn.kind, conn.state, conn.local, conn.peer) == \
            ("web", 4, "stream", "ESTABLISHED", "198.18.1.1:80", "198.19.1.1:5555")
        with pytest.raises(EngineError) as e:
            c.tenant_del("ghost")
        assert e.value.errno_name == "ENOENT" and e.value.engine_message == "no such tenant"
        c.dns_upstream("198.18.0.1", 53)  # the connection survives an err reply
    finally:
        c.close()


def test_parse_ignores_unknown_lines() -> None:
    stats = parse_stats(["future thing", "tenant a id=1 nsm=k sockets=0 tx_bytes=1 rx_bytes=2"])
    assert stats[0].rx_bytes == 2
    assert parse_conns(["conn tenant=a slot=1 kind=dgram state=OPEN local=x:1 peer=y:2 "
                        "tx_bytes=0 rx_bytes=0 rtt_us=5"])[0].kind == "dgram"


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
    out = subprocess.run(["ip", "-n", f"nk-t-{t.name}", "-o", "link"],
                         capture_output=True, text=True, check=True).stdout
    assert [line.split(":")[1].strip() for line in out.splitlines()] == ["lo"]
    assert "state UNKNOWN" in out or "LOWER_UP" in out  # lo is up
    addrs = subprocess.run(["ip", "-n", "nk-nsm-kernel", "-o", "addr", "show", "dev", "eth0"],
                           capture_output=True, text=True, check=True).stdout
    assert f"{t.ipv4}/32" in addrs and f"{t.ipv6}/128" in addrs
    # No route off the machine from the NSM.
    routes = subprocess.run(["ip", "-n", "nk-nsm-kernel", "route", "show", "default"],
                            capture_output=True, text=True).stdout
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
        assert {"name", "nsm", "ipv4", "ipv6", "pids", "sockets", "tx_bytes", "rx_bytes"} <= set(info)
        assert info["nsm"] == "kernel" and info["ipv4"] == t.ipv4 and info["ipv6"] == t.ipv6
        assert info["ipv4"].startswith("198.18.1.") and info["ipv6"].startswith("fd6e:6b00::1:")
        assert len(info["pids"]) == 1
        table = nk("ps", check=True).stdout.splitlines()
        assert table[0].split()[:4] == ["NAME", "NSM", "IPV4", "IPV6"]
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


def test_down_removes_everything_and_nsm_mismatch(nk_daemon: Daemon, tmp_path: Path) -> None:
    # Restart with two NSMs; this test leaves the daemon up with the default config.
    cfg = tmp_path / "two.toml"
    cfg.write_text('[[nsm]]\nname = "kernel"\n[[nsm]]\nname = "alt"\n')
    nk_daemon.down()
    try:
        nk_daemon.up("--config", str(cfg))
        assert {"nk-nsm-kernel", "nk-nsm-alt"} <= set(netns_names())
        nk("tenant", "create", "t-alt", "--nsm", "alt", check=True)
        proc = nk("run", "--tenant", "t-alt", "--nsm", "kernel", "--", "true")
        assert proc.returncode == 1
        assert "is on NSM 'alt'" in proc.stderr and "not supported yet" in proc.stderr
        assert nk("run", "--tenant", "t-alt", "--nsm", "alt", "--", "true").returncode == 0

        proc = nk("down", check=True)
        assert "down" in proc.stdout
        assert not [n for n in netns_names() if n.startswith("nk-")]
        assert not [n for n in link_names() if n == "nk0" or n.startswith("nkn-")]
        assert not Path("/run/netkernel/daemon.sock").exists()
        # Idempotent, with a clear message.
        proc = nk("down", check=True)
        assert "not running" in proc.stdout
    finally:
        nk("down")
        nk_daemon.up()
