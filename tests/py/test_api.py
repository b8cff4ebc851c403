"""Control API, metrics and log formats, in-process: no daemon, no namespaces.

The API server runs on a socket in a temp dir with handlers that answer canned data, so
these check the protocol itself (version, ops, fields, errors, permissions) and how the CLI
finds the socket.
"""

from __future__ import annotations

import grp
import io
import json
import logging
import os
import socket
import stat
import urllib.request
from collections.abc import Iterator
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from netkernel import api, cli, daemon_log
from netkernel.config import Policy
from netkernel.engine import NSMStats, TenantStats
from netkernel.errors import DaemonError
from netkernel.metrics import MetricsServer, NetKernelCollector, NSMSample, Snapshot, TenantSample


def _canned(req: dict[str, Any]) -> dict[str, Any]:
    return {"echo": req}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, api.ApiServer]]:
    """One server for the module (stopping one takes half a second); tests that change its
    handlers do so with monkeypatch, which puts them back."""
    path = tmp_path_factory.mktemp("api") / "api.sock"
    srv = api.ApiServer(path, {op: _canned for op in api.OPS})
    srv.start()
    yield path, srv
    srv.stop()


def raw_request(path: Path, line: bytes) -> dict[str, Any]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(str(path))
        s.sendall(line + b"\n")
        reply = s.makefile("rb").readline()
    result: dict[str, Any] = json.loads(reply)
    return result


@pytest.mark.parametrize(
    ("request_line", "error"),
    [
        (b"hello", "bad request: not JSON"),
        (b"[1, 2]", "bad request: expected a JSON object"),
        (b'{"op": "status"}', 'missing "v" (the protocol version; this daemon speaks 1)'),
        (b'{"v": 2, "op": "status"}', "unsupported protocol version 2: this daemon speaks 1"),
        (b'{"v": 1}', 'missing "op"'),
        (b'{"v": 1, "op": "explode"}', "unknown op 'explode' (known: status, ps, conns,"),
        (b'{"v": 1, "op": "tenant-set"}', "op 'tenant-set' needs field 'name' (a string)"),
        (b'{"v": 1, "op": "tenant-move", "name": "web"}', "op 'tenant-move' needs field 'nsm'"),
        (b'{"v": 1, "op": "tenant-set", "name": 3}', "field 'name' must be a string, not 3"),
        (
            b'{"v": 1, "op": "tenant-set", "name": "w", "weight": true}',
            "field 'weight' must be a number or a string, not true",
        ),
        (
            b'{"v": 1, "op": "tenant-set", "name": "w", "rate": 5}',
            "op 'tenant-set': unknown field(s) 'rate' (known: name, rate_tx, rate_rx, weight",
        ),
    ],
)
def test_bad_requests_get_actionable_errors(
    server: tuple[Path, api.ApiServer], request_line: bytes, error: str
) -> None:
    path, _ = server
    reply = raw_request(path, request_line)
    assert reply["ok"] is False
    assert error in reply["error"], reply["error"]


def test_good_request_reaches_handler_without_nulls(server: tuple[Path, api.ApiServer]) -> None:
    path, _ = server
    reply = api.call("tenant-create", path=path, name="web", nsm=None, rate_tx="200Mbit")
    assert reply["echo"] == {"v": 1, "op": "tenant-create", "name": "web", "rate_tx": "200Mbit"}
    # Several requests on one connection, in order.
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(str(path))
        s.sendall(b'{"v": 1, "op": "ps"}\n{"v": 1, "op": "nsm-list"}\n')
        f = s.makefile("rb")
        assert [json.loads(f.readline())["echo"]["op"] for _ in range(2)] == ["ps", "nsm-list"]


def test_socket_is_root_only_by_default(server: tuple[Path, api.ApiServer]) -> None:
    path, _ = server
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_api_group_gets_0660(tmp_path: Path) -> None:
    group = grp.getgrgid(os.getgid())
    path = tmp_path / "sub" / "api.sock"  # a missing parent directory is made
    srv = api.ApiServer(path, {op: _canned for op in api.OPS}, group=group.gr_name)
    try:
        st = path.stat()
        assert stat.S_IMODE(st.st_mode) == 0o660 and st.st_gid == group.gr_gid
    finally:
        srv.stop()
    assert not path.parent.exists()


def test_cli_finds_socket_from_option_then_env(
    server: tuple[Path, api.ApiServer],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path, srv = server
    monkeypatch.setattr(srv, "handlers", {**srv.handlers, "ps": lambda req: {"tenants": []}})
    monkeypatch.setattr(api, "socket_override", None)
    monkeypatch.setenv("NETKERNEL_API_SOCKET", str(tmp_path / "nothing.sock"))
    assert cli.main(["ps", "--json"]) == 1
    assert "daemon is not running" in capsys.readouterr().err
    assert cli.main(["--api-socket", str(path), "ps", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"tenants": []}
    monkeypatch.setenv("NETKERNEL_API_SOCKET", str(path))
    assert cli.main(["tenant", "list", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"tenants": []}


def test_cli_bad_input_is_a_usage_error_before_any_request(
    server: tuple[Path, api.ApiServer], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path, srv = server
    seen: list[str] = []

    def record(req: dict[str, Any]) -> dict[str, Any]:
        seen.append(req["op"])
        return {}

    monkeypatch.setattr(srv, "handlers", {op: record for op in api.OPS})
    monkeypatch.setenv("NETKERNEL_API_SOCKET", str(path))
    cases = [
        (
            ["tenant", "set", "web", "--rate-tx", "20 0Mbit"],
            "argument --rate-tx: '20 0Mbit' is not a rate; use e.g. 200Mbit, 1.5Gbit",
        ),
        (["tenant", "set", "web"], "nothing to change"),
        (["tenant", "set", "web", "--rate", "1G", "--rate-rx", "2G"], "--rate sets both directions"),
        (["tenant", "create", "web", "--weight", "0"], "argument --weight: 0 is not a valid weight"),
        (["tenant", "create", "web", "--max-memory", "lots"], "argument --max-memory: 'lots' is not a size"),
        (["tenant", "move", "web"], "the following arguments are required: --nsm"),
        (["nsm", "add", "x", "--congestion-control", "vegas"], "'vegas' is not offered by this kernel"),
        (["nsm", "add", "x", "--sysctl", "kernel.panic=1"], "is not a net.* sysctl"),
        (["nsm", "add", "x", "--sysctl", "net.core.somaxconn"], "is not KEY=VALUE"),
        (["top", "--interval", "0"], "is not a positive number of seconds"),
        (["top", "--iterations", "-1"], "argument --iterations"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as e:
            cli.main(argv)
        assert e.value.code == 2, argv
        assert message in capsys.readouterr().err, argv
    assert seen == []


def test_top_prints_one_json_object_per_refresh(
    server: tuple[Path, api.ApiServer], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path, srv = server
    tenant = {
        "name": "web",
        "nsm": "kernel",
        "sockets": 2,
        "tx_bytes": 10,
        "rx_bytes": 20,
        "tx_bps": 8e6,
        "rx_bps": 0,
        "policy": {"rate_tx": 0, "rate_rx": 0, "weight": 1, "max_sockets": 1024, "max_memory": 0},
    }
    monkeypatch.setattr(srv, "handlers", {**srv.handlers, "ps": lambda req: {"tenants": [tenant]}})
    monkeypatch.setenv("NETKERNEL_API_SOCKET", str(path))
    assert cli.main(["top", "--json", "--iterations", "3", "--interval", "0.01"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3
    assert [json.loads(line)["tenants"][0]["tx_bps"] for line in lines] == [8e6] * 3
    assert cli.main(["top", "--iterations", "2", "--interval", "0.01"]) == 0
    out = capsys.readouterr().out
    assert "\x1b[" not in out  # not a terminal: plain successive tables
    assert out.count("NAME") == 2 and "8Mbit/s" in out
    assert "CC-ALLOWED" in out and " off " in out  # tenant_cc not in its policy: off

    # With tenant_cc: the rate it allows now and the congestion seen.
    cc = {
        **tenant,
        "name": "db",
        "policy": {**tenant["policy"], "tenant_cc": True},  # type: ignore[dict-item]
        "cc_rate_bps": 120_000_000,
        "cc_queue_delay_seconds": 0.0015,
        "cc_retransmits": 7,
    }
    monkeypatch.setattr(srv, "handlers", {**srv.handlers, "ps": lambda req: {"tenants": [cc]}})
    assert cli.main(["top", "--iterations", "1", "--interval", "0.01"]) == 0
    row = next(ln.split() for ln in capsys.readouterr().out.splitlines() if ln.startswith("db "))
    assert row[0] == "db" and ["120Mbit/s", "1.50ms", "7"] == row[8:11], row


def test_daemon_error_text_reaches_the_cli(
    server: tuple[Path, api.ApiServer], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path, srv = server

    def refuse(req: dict[str, Any]) -> dict[str, Any]:
        raise DaemonError("NSM 'alt' still serves tenant(s) db; move them first")

    monkeypatch.setattr(srv, "handlers", {**srv.handlers, "nsm-remove": refuse})
    monkeypatch.setenv("NETKERNEL_API_SOCKET", str(path))
    assert cli.main(["nsm", "remove", "alt"]) == 1
    assert (
        capsys.readouterr().err.strip() == "netkernel: NSM 'alt' still serves tenant(s) db; move them first"
    )


# -- metrics ---------------------------------------------------------------------------------


def _tenant_stats(name: str, nsm: str, **values: int) -> TenantStats:
    zeros = {f.name: 0 for f in fields(TenantStats) if f.name not in ("name", "nsm")}
    return TenantStats(name=name, nsm=nsm, **(zeros | values))


def _snapshot() -> Snapshot:
    return Snapshot(
        up=True,
        tenants=(
            TenantSample(
                "web",
                "kernel",
                Policy(rate_tx=200_000_000, weight=2),
                _tenant_stats(
                    "web",
                    "kernel",
                    sockets=3,
                    tx_bytes=1000,
                    rx_bytes=2000,
                    memory=6 << 20,
                    rate_tx=200_000_000,
                    rate_rx=0,
                    weight=2,
                    refused_sockets=4,
                    refused_memory=1,
                ),
            ),
            # An engine that did not report this tenant: policy gauges only, no fake zeros.
            TenantSample("db", "alt", Policy(weight=5), None),
        ),
        nsms=(
            NSMSample(
                "kernel",
                1,
                NSMStats(
                    "kernel",
                    tenants=1,
                    sockets=3,
                    tx_bytes=1000,
                    rx_bytes=2000,
                    bandwidth=0,
                    up=1,
                    connects=0,
                ),
            ),
            NSMSample("alt", 1, None),
        ),
    )


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_metrics_parse_with_prometheus_parser() -> None:
    from prometheus_client.registry import CollectorRegistry

    registry = CollectorRegistry(auto_describe=False)
    registry.register(NetKernelCollector(_snapshot))
    samples = _samples(generate_latest(registry).decode())
    web = (("nsm", "kernel"), ("tenant", "web"))
    db = (("nsm", "alt"), ("tenant", "db"))
    assert samples[("netkernel_up", ())] == 1
    assert samples[("netkernel_tenant_tx_bytes_total", web)] == 1000
    assert samples[("netkernel_tenant_rx_bytes_total", web)] == 2000
    assert samples[("netkernel_tenant_sockets_refused_total", web)] == 5
    assert samples[("netkernel_tenant_sockets", web)] == 3
    assert samples[("netkernel_tenant_memory_bytes", web)] == 6 << 20
    assert samples[("netkernel_tenant_rate_limit_tx_bps", web)] == 200_000_000
    assert samples[("netkernel_tenant_rate_limit_rx_bps", web)] == 0
    assert samples[("netkernel_tenant_weight", web)] == 2
    assert samples[("netkernel_tenant_weight", db)] == 5
    assert ("netkernel_tenant_tx_bytes_total", db) not in samples
    assert samples[("netkernel_nsm_tx_bytes_total", (("nsm", "kernel"),))] == 1000
    assert samples[("netkernel_nsm_sockets", (("nsm", "kernel"),))] == 3
    assert samples[("netkernel_nsm_tenants", (("nsm", "alt"),))] == 1
    assert ("netkernel_nsm_sockets", (("nsm", "alt"),)) not in samples


def test_metrics_server_serves_fresh_snapshots() -> None:
    calls: list[int] = []

    def snapshot() -> Snapshot:
        calls.append(1)
        return Snapshot(up=len(calls) > 1, tenants=(), nsms=())

    server = MetricsServer("127.0.0.1", 0, snapshot)
    server.start()
    try:
        url = f"http://127.0.0.1:{server.port}/metrics"
        for expected in (0, 1):
            with urllib.request.urlopen(url, timeout=5) as r:
                assert _samples(r.read().decode())[("netkernel_up", ())] == expected
    finally:
        server.stop()
    # A port already taken is an error that says what to change.
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = MetricsServer("127.0.0.1", busy.getsockname()[1], snapshot)
        with pytest.raises(Exception, match=r"cannot listen.*metrics_listen"):
            taken.start()


# -- structured logs ---------------------------------------------------------------------------


def _capture(fmt: str) -> str:
    out = io.StringIO()
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        daemon_log.configure_logging("info", fmt, stream=out)
        daemon_log.log_event(
            "tenant_created", tenant="web", nsm="kernel", rate_tx=200_000_000, note="a b", skipped=None
        )
    finally:
        root.handlers[:], _ = saved
        root.setLevel(saved[1])
    return out.getvalue()


def test_log_event_text_and_json() -> None:
    text = _capture("text")
    assert text.rstrip().endswith(
        'netkernel.daemon: event=tenant_created tenant=web nsm=kernel rate_tx=200000000 note="a b"'
    )
    doc = json.loads(_capture("json"))
    assert {k: doc[k] for k in ("event", "tenant", "nsm", "rate_tx", "note", "level", "logger")} == {
        "event": "tenant_created",
        "tenant": "web",
        "nsm": "kernel",
        "rate_tx": 200_000_000,
        "note": "a b",
        "level": "info",
        "logger": "netkernel.daemon",
    }
    assert "skipped" not in doc
