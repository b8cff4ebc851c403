"""Property-based fuzzing (hypothesis) of the control plane's input parsers: the config file
(config.parse_config on TOML-shaped data, config.load_config on generated TOML text, mangled
text and raw bytes) and the API's request checker (api.check_request, and whole JSON lines
through api._RequestHandler). Whatever they are given, they may only answer with their own
error, ConfigError or DaemonError, carrying a message; anything else escaping is a bug (a
traceback for the operator, or "internal error" from the daemon).

The documents are built from the schema's keys and from values chosen to reach each check
(rates, sizes, paths, addresses, names, sysctls, numbers past every limit), plus anything
TOML or JSON can hold. Examples per test: NETKERNEL_FUZZ_EXAMPLES (default 300). No daemon,
no root needed; nothing outside a temp dir is written.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import socket
import tempfile
from pathlib import Path
from typing import Any
from unittest import mock

import pytest

pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from netkernel import api, config  # noqa: E402
from netkernel.errors import ConfigError, DaemonError  # noqa: E402

EXAMPLES = int(os.environ.get("NETKERNEL_FUZZ_EXAMPLES", "300"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)

# ---- values ----

NOTABLE_STRINGS = [
    "",
    " ",
    "0",
    "1",
    "-1",
    "7",
    " 7 ",
    "4294967296",
    "200Mbit",
    "1.5Gbit",
    "500M",
    "10kbit/s",
    "0.0001k",
    "512MiB",
    "2GiB",
    "64K",
    "3TB",
    "1.5 G",
    "9" * 400,
    "9" * 400 + "Mbit",
    "9" * 400 + "GiB",
    "1e9",
    "on",
    "off",
    "yes",
    "true",
    "kernel",
    "lwip",
    "cubic",
    "reno",
    "bbr",
    "nosuchcc",
    "text",
    "json",
    "/",
    "/tmp",
    "/nonexistent",
    "relative/path",
    "/" + "a" * 300,
    "/a\x00b",
    "/run/netkernel/daemon.sock",
    "/" + "d/" * 60,
    "127.0.0.1:9464",
    "[::1]:0",
    "localhost:70000",
    "[fe80::1%eth0]:80",
    "host:port",
    "198.18.0.0/15",
    "fd6e:6b00::/64",
    "10.0.0.0/33",
    "::/200",
    "198.18.0.1/15",
    "10.0.0.0/24",
    "web",
    "a",
    "Web",
    "a" * 40,
    "x\ny",
    "root",
    "nogroup",
    "a\x00b",
    "net.ipv4.tcp_wmem",
    "net.core.somaxconn",
    "4096 16384 4194304",
    "\u00b2",
    "\u0663",
]
NOTABLE_INTS = [
    0,
    1,
    -1,
    2,
    19,
    20,
    -20,
    -21,
    255,
    256,
    1000,
    65535,
    65536,
    2**31,
    2**32,
    2**63 - 1,
    -(2**63),
]


def scalars() -> st.SearchStrategy[Any]:
    return st.one_of(
        st.sampled_from(NOTABLE_STRINGS),
        st.from_regex(r"\d{1,450}(\.\d{1,5})? ?[kmgtKMGT]?(i?[bB]|bit|bit/s|bps)?", fullmatch=True),
        st.text(max_size=30),
        st.sampled_from(NOTABLE_INTS),
        st.integers(min_value=-(2**63), max_value=2**63 - 1),
        st.floats(),
        st.booleans(),
        st.datetimes(),
        st.dates(),
        st.times(),
    )


def values() -> st.SearchStrategy[Any]:
    return st.recursive(
        SCALARS,
        lambda inner: st.one_of(
            st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)
        ),
        max_leaves=8,
    )


# Built once: hypothesis validates every strategy object it is given, which costs more than the
# parsing under test when strategies are made afresh for each example.
SCALARS = scalars()
VALUES = values()


SYSCTLS = [
    "net.core.somaxconn",
    "net.ipv4.tcp_wmem",
    "net.ipv4.ip_nonlocal_bind",
    "net.ipv4.conf.eth0.forwarding",
    "net.ipv4.tcp_congestion_control",
    "kernel.pid_max",
    "net..x",
    "net.nosuch",
    "net." + "a" * 300,
    "net.ipv4." + "b/" * 10,
]
NAMES = ["kernel", "lwip1", "web", "db", "a", "Kernel", "1abc", "x" * 12, "web", "-", ""]
KEYS = {
    "daemon": ("api_socket", "api_group", "metrics_listen", "log_format", "engine_nice"),
    "network": ("ipv4_subnet", "ipv6_prefix"),
    "defaults": tuple(config.POLICY_PARSERS),
    "nsm": ("name", "kind", "congestion_control", "bandwidth", "sysctl"),
    "tenant": ("name", "nsm", "rw", "ro", *config.POLICY_PARSERS),
}


def table(section: str) -> st.SearchStrategy[dict[str, Any]]:
    special = {
        "name": st.sampled_from(NAMES) | SCALARS,
        "nsm": st.sampled_from(NAMES) | SCALARS,
        "kind": st.sampled_from(["kernel", "lwip", "dpdk"]) | SCALARS,
        "sysctl": st.dictionaries(st.sampled_from(SYSCTLS) | st.text(max_size=10), SCALARS, max_size=3)
        | VALUES,
        "rw": st.lists(
            st.sampled_from(["/tmp", "/", "/nonexistent", "/" + "a" * 300, "/a\x00b", "tmp"]) | SCALARS,
            max_size=3,
        )
        | VALUES,
    }
    special["ro"] = special["rw"]
    known = (st.tuples(st.just(k), special.get(k, VALUES)) for k in KEYS[section])
    key_values = st.one_of(*known, st.tuples(st.text(max_size=8), VALUES))
    return st.lists(key_values, max_size=7).map(dict)


def documents() -> st.SearchStrategy[dict[str, Any]]:
    """Dicts as tomllib returns them, shaped like a NetKernel config."""
    addresses = st.sampled_from(["198.19.1.1", "::1", "", "1.2.3"]) | SCALARS
    hosts = st.dictionaries(st.text(max_size=10), addresses, max_size=3)
    sections = {
        "daemon": table("daemon") | VALUES,
        "network": table("network") | VALUES,
        "defaults": table("defaults") | VALUES,
        "nsm": st.lists(table("nsm"), max_size=3) | VALUES,
        "tenant": st.lists(table("tenant"), max_size=4) | VALUES,
        "dns": st.fixed_dictionaries({}, optional={"hosts": hosts | VALUES}) | VALUES,
    }
    known = st.fixed_dictionaries({}, optional=sections)  # type: ignore[arg-type]
    extra = st.dictionaries(st.text(max_size=8), VALUES, max_size=2)
    return st.tuples(known, extra).map(lambda t: {**t[1], **t[0]})


DOCUMENTS = documents()


# ---- TOML text ----

_BARE = re.compile(r"^[A-Za-z0-9_-]+$")


def toml_string(s: str) -> str:
    out = []
    for c in s:
        if c in '"\\':
            out.append("\\" + c)
        elif ord(c) < 0x20 or ord(c) == 0x7F:
            out.append(f"\\u{ord(c):04x}")
        else:
            out.append(c)
    return '"' + "".join(out) + '"'


def toml_key(k: str) -> str:
    return k if _BARE.match(k) else toml_string(k)


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if v != v:
            return "nan"
        if v in (float("inf"), float("-inf")):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return toml_string(v)
    if isinstance(v, datetime.datetime | datetime.date | datetime.time):
        return v.isoformat()
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{toml_key(k)} = {toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(v)


def toml_document(doc: dict[str, Any]) -> str:
    """TOML text for doc: scalars first, then [tables] and [[arrays of tables]]."""
    head, tables = [], []
    for k, v in doc.items():
        if isinstance(v, dict):
            tables.append(f"[{toml_key(k)}]")
            tables += [f"{toml_key(ik)} = {toml_value(iv)}" for ik, iv in v.items()]
        elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            for item in v:
                tables.append(f"[[{toml_key(k)}]]")
                tables += [f"{toml_key(ik)} = {toml_value(iv)}" for ik, iv in item.items()]
        else:
            head.append(f"{toml_key(k)} = {toml_value(v)}")
    return "\n".join(head + tables) + "\n"


@st.composite
def config_files(draw: st.DrawFn) -> bytes:
    kind = draw(st.integers(0, 9))
    if kind == 0:
        return draw(st.binary(max_size=200))
    text = toml_document(draw(DOCUMENTS))
    if kind >= 6:  # mangled: a character changed, a piece cut out or repeated
        for _ in range(draw(st.integers(1, 3))):
            if not text:
                break
            at = draw(st.integers(0, len(text) - 1))
            what = draw(st.integers(0, 2))
            if what == 0:
                text = text[:at] + draw(st.sampled_from("[]{}=\"'#.,\n\\ ")) + text[at + 1 :]
            elif what == 1:
                text = text[:at] + text[at + draw(st.integers(1, 20)) :]
            else:
                text = text[:at] + text[at : at + 30] + text[at:]
    return text.encode()


# ---- the properties ----


def _config_must_fail_cleanly(fn: Any, arg: Any) -> None:
    try:
        result = fn(arg)
    except ConfigError as e:
        assert str(e).strip(), f"ConfigError without a message for {arg!r}"
    except Exception as e:  # the bug this test is about
        raise AssertionError(
            f"{type(e).__name__} escaped {fn.__name__}() instead of ConfigError: "
            f"{e!s:.300}\ninput: {arg!r:.2000}"
        ) from e
    else:
        assert isinstance(result, config.Config)


# Inputs that once let something other than ConfigError out: kept as fixed examples.
@FUZZ
@given(DOCUMENTS)
@example({"defaults": {"rate_tx": "9" * 400}})  # OverflowError from int(float(...))
@example({"defaults": {"max_memory": "9" * 400 + "GiB"}})
@example({"tenant": [{"name": "web", "rw": ["/a\x00b"]}]})  # ValueError: embedded null byte
@example({"tenant": [{"name": "web", "ro": ["/" + "a" * 300]}]})  # OSError: name too long
@example({"nsm": [{"name": "kernel", "sysctl": {"net." + "a" * 300: 1}}]})
@example({"daemon": {"api_group": "a\x00b"}})  # ValueError from grp.getgrnam
def test_parse_config(doc: dict[str, Any]) -> None:
    _config_must_fail_cleanly(config.parse_config, doc)


@FUZZ
@given(config_files())
@example(b"a = " + b"[" * 5000 + b"]" * 5000)  # RecursionError from tomllib
@example(b'[defaults]\nrate_rx = "' + b"9" * 400 + b'"\n')
def test_load_config(data: bytes) -> None:
    with tempfile.TemporaryDirectory(prefix="nk-fuzz-config-") as d:
        path = Path(d) / "netkernel.toml"
        path.write_bytes(data)
        try:
            _config_must_fail_cleanly(config.load_config, path)
        except AssertionError as e:
            raise AssertionError(f"{e}\nTOML text:\n{data.decode(errors='replace')[:3000]}") from None
        try:
            config.load_config(path)
        except ConfigError as e:
            assert str(path) in str(e), f"the message does not name the file: {e}"


FIELDS = sorted({name for op in api.OPS.values() for name in (*op.required, *op.optional)})


def json_values() -> st.SearchStrategy[Any]:
    return st.recursive(
        st.none()
        | st.booleans()
        | st.integers()
        | st.floats()
        | st.text(max_size=20)
        | st.sampled_from(NOTABLE_STRINGS)
        | st.sampled_from(NOTABLE_INTS),
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
        max_leaves=10,
    )


def requests() -> st.SearchStrategy[Any]:
    shaped = st.builds(
        lambda v, op, fields: {"v": v, "op": op, **fields},
        st.sampled_from([1, 1.0, True, 0, 2, "1", None]) | json_values(),
        st.sampled_from(sorted(api.OPS)) | json_values(),
        st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=8), json_values(), max_size=5),
    )
    partial = shaped.flatmap(
        lambda r: st.sets(st.sampled_from(sorted(r))).map(
            lambda drop: {k: v for k, v in r.items() if k not in drop}
        )
    )
    return st.one_of(shaped, partial, json_values())


@FUZZ
@given(requests())
def test_check_request(req: Any) -> None:
    try:
        out = api.check_request(req)
    except DaemonError as e:
        assert str(e).strip()
        return
    except Exception as e:
        raise AssertionError(f"{type(e).__name__} escaped check_request(): {e}\ninput: {req!r:.2000}") from e
    # Accepted: only the op's fields, each of a type the op takes.
    spec = api.OPS[out["op"]]
    allowed = {**spec.required, **spec.optional}
    for name, value in out.items():
        if name in ("v", "op"):
            continue
        assert name in allowed, f"field {name!r} passed for op {out['op']!r}"
        types = allowed[name]
        assert isinstance(value, types) and (bool in types or not isinstance(value, bool)), (name, value)
    assert all(name in out for name in spec.required)


class _Server:
    """What _RequestHandler needs of ApiServer: every op answers with the fields it got."""

    group = None
    handlers = {op: (lambda req: {"fields": sorted(req)}) for op in api.OPS}


def _roundtrip(data: bytes) -> list[dict[str, Any]]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        b.sendall(data)
        b.shutdown(socket.SHUT_WR)
        with mock.patch.object(api, "peer_refusal", return_value=None):
            api._RequestHandler(a, "", _Server())  # type: ignore[arg-type]
        a.close()
        out = b""
        while chunk := b.recv(65536):
            out += chunk
    finally:
        a.close()
        b.close()
    return [json.loads(line) for line in out.splitlines()]


def request_lines() -> st.SearchStrategy[bytes]:
    line = st.one_of(
        requests().map(lambda r: json.dumps(r).encode()),
        st.binary(max_size=60).map(lambda b: b.replace(b"\n", b" ")),
        st.text(max_size=60).map(lambda s: s.replace("\n", " ").encode()),
    )
    return st.lists(line, min_size=1, max_size=4).map(lambda ls: b"\n".join(ls) + b"\n")


@FUZZ
@given(request_lines())
@example(b'{"v": 1, "op": "status"}\n')
@example(b"1" * 5000 + b"\n")  # ValueError (int digits limit), not a JSONDecodeError
@example(b"[" * 100000 + b"\n")  # RecursionError from the JSON parser
def test_request_handler(data: bytes) -> None:
    replies = _roundtrip(data)
    lines = data.count(b"\n")
    assert len(replies) == lines, f"{len(replies)} replies to {lines} lines"
    for reply in replies:
        assert isinstance(reply, dict) and isinstance(reply.get("ok"), bool), reply
        if not reply["ok"]:
            assert isinstance(reply.get("error"), str) and reply["error"].strip(), reply
            assert not reply["error"].startswith("internal error"), (
                f"a request line made the daemon fail inside: {reply['error']}\ninput: {data!r:.2000}"
            )
