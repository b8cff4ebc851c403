"""The daemon's views, API handlers and move helpers on a Daemon that was never started: its
records are filled in by hand and a fake engine answers stats and conns. No root, no
namespaces, no daemon (the names used are ones a running daemon does not have)."""

from __future__ import annotations

import io
import ipaddress
import json
import logging
import socketserver
import threading
from collections.abc import Iterator
from dataclasses import fields
from pathlib import Path

import pytest

from netkernel import api, daemon_log, handlers, move, views
from netkernel.config import Config, NSMConfig, Policy
from netkernel.daemon import Daemon
from netkernel.engine import EngineClient, TenantStats
from netkernel.errors import TenantError, UnknownNSMError
from netkernel.records import NSM, Tenant

NAME = "zz-split"


def _stats(tx: int, refused: int) -> str:
    """A stats reply with every key the engine writes; those not given are 0."""
    given = {
        "id": 258,
        "nsm": "zzlw",
        "sockets": 3,
        "tx_bytes": tx,
        "max_sockets": 5,
        "refused_sockets": refused,
    }
    tenant = " ".join(f"{f.name}={given.get(f.name, 0)}" for f in fields(TenantStats) if f.name != "name")
    return (
        f"tenant {NAME} {tenant}\n"
        "nsm zzlw type=lwip tenants=1 sockets=3 tx_bytes=0 rx_bytes=0 bandwidth=0 up=1 connects=3\nok\n"
    )


class _FakeEngine(socketserver.StreamRequestHandler):
    replies = {
        "stats": _stats(1000, 0),
        f"conns {NAME}": f"conn tenant={NAME} kind=stream nsm=zzlw proto=tcp local=198.18.1.1:80 "
        "peer=198.19.1.1:5555\n"
        f"conn tenant={NAME} kind=stream nsm=other proto=tcp local=198.18.1.1:81 "
        "peer=198.19.1.1:5556\n"
        f"conn tenant={NAME} kind=dgram nsm=zzlw proto=udp local=198.18.1.1:53 "
        "peer=0.0.0.0:0\nok\n",
    }

    def handle(self) -> None:
        for line in self.rfile:
            self.wfile.write(self.replies.get(line.decode().strip(), "ok\n").encode())


@pytest.fixture
def daemon(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Daemon]:
    monkeypatch.setitem(_FakeEngine.replies, "stats", _stats(1000, 0))
    path = tmp_path / "admin.sock"
    server = socketserver.ThreadingUnixStreamServer(str(path), _FakeEngine)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    d = Daemon(Config())
    d.engine_client = EngineClient(path)
    # An lwIP NSM: its namespace is never entered for a view (no sysctl to read there).
    d.nsms["zzlw"] = NSM(NSMConfig("zzlw", "lwip", None, 0, ()), 3)
    d.tenants[NAME] = Tenant(NAME, "zzlw", 1, 258, "198.18.1.1", "fd6e:6b00::1:1", Policy())
    yield d
    d.engine_client.close()
    server.shutdown()
    server.server_close()


def test_handlers_answer_from_the_records_and_the_engine(daemon: Daemon) -> None:
    h = handlers.api_handlers(daemon)
    assert set(h) == set(api.OPS)
    assert [(n["name"], n["ipv4"], n["tenants"]) for n in h["status"]({})["nsms"]] == [("zzlw", None, 1)]
    (nsm,) = h["nsm-list"]({})["nsms"]
    assert (nsm["tenants"], nsm["up"], nsm["restarts"], nsm["congestion_control"]) == ([NAME], True, 2, None)
    (t,) = h["ps"]({})["tenants"]
    assert (t["name"], t["sockets"], t["pids"], t["tx_bps"]) == (NAME, 3, [], None)
    assert len(h["conns"]({"tenant": NAME})["conns"]) == 3
    with pytest.raises(TenantError, match="no tenant named 'nope'"):
        h["conns"]({"tenant": "nope"})
    snap = views.metrics_snapshot(daemon)
    assert snap.up and snap.tenants[0].stats is not None and snap.nsms[0].tenants == 1
    h["shutdown"]({})
    assert daemon.stop_event.is_set()


def test_rates_and_refused_sockets(daemon: Daemon, monkeypatch: pytest.MonkeyPatch) -> None:
    out = io.StringIO()
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        daemon_log.configure_logging("info", "json", stream=out)
        daemon.rates.record(daemon.engine_client.stats(), 1.0)
        monkeypatch.setitem(_FakeEngine.replies, "stats", _stats(2000, 2))
        daemon.rates.record(daemon.engine_client.stats(), 2.0)
    finally:
        root.handlers[:], _ = saved
        root.setLevel(saved[1])
    assert daemon.rates.tenants[NAME] == (8000.0, 0.0)
    assert handlers.api_handlers(daemon)["ps"]({})["tenants"][0]["tx_bps"] == 8000
    (event,) = [json.loads(line) for line in out.getvalue().splitlines()]
    assert {k: event[k] for k in ("event", "tenant", "reason", "limit", "count", "logger")} == {
        "event": "sockets_refused",
        "tenant": NAME,
        "reason": "max_sockets",
        "limit": 5,
        "count": 2,
        "logger": "netkernel.daemon",
    }
    daemon.rates.forget(NAME)
    assert NAME not in daemon.rates.tenants


def test_move_helpers(daemon: Daemon) -> None:
    nsm, t = daemon.nsms["zzlw"], daemon.tenants[NAME]
    assert move.lwip_mac(nsm, t) == "02:4e:4b:04:01:02"
    # Of the tenant's connections the engine lists, steering pins the TCP ones on this NSM.
    flows = move._steer_args(daemon.engine_client, t, nsm, None)["old_flows"]({ipaddress.ip_address(t.ipv4)})
    assert [(f.remote_port, f.local_port) for f in flows] == [(5555, 80)]
    with pytest.raises(UnknownNSMError, match=r"unknown NSM 'nosuch' \(configured: zzlw\)"):
        move.move_tenant(daemon, NAME, "nosuch")
    assert move.move_tenant(daemon, NAME, "zzlw") == (t, None, None)
    assert not daemon.lock.locked()
