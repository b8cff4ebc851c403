"""Config parsing and policy values, in-process: no daemon, no root needed.

Every rejected config must say which file, which line, which key, why, and what is allowed.
"""

from __future__ import annotations

import grp
import os
from pathlib import Path

import pytest

from netkernel import config
from netkernel.config import (
    Config,
    Policy,
    format_key_path,
    format_rate,
    load_config,
    locate_key,
    parse_config,
    parse_rate,
    parse_size,
    policy_with,
)
from netkernel.errors import ConfigError

FULL = """\
[daemon]
api_socket = "/run/netkernel/other.sock"
metrics_listen = "[::1]:9999"
log_format = "json"
engine_nice = 0

[network]
ipv4_subnet = "198.18.0.0/15"

[defaults]
max_sockets = 100
max_memory = "2GiB"
rate_tx = "0"
weight = 1

[[nsm]]
name = "kernel"
kind = "kernel"
congestion_control = "reno"

[[nsm]]
name = "fast"
congestion_control = "bbr"
bandwidth = "500Mbit"
[nsm.sysctl]
"net.ipv4.tcp_wmem" = "4096 16384 4194304"
"net.core.somaxconn" = 4096

[[tenant]]
name = "web"
nsm = "fast"
rate_tx = "200Mbit"
rate_rx = 0
weight = 2
max_memory = "512MiB"

[[tenant]]
name = "db"

[dns]
hosts = { "db.example" = "198.19.1.1" }
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "netkernel.toml"
    path.write_text(text)
    return path


def test_full_config(tmp_path: Path) -> None:
    c = load_config(write(tmp_path, FULL))
    assert c.api_socket == Path("/run/netkernel/other.sock")
    assert c.metrics_listen == ("::1", 9999)
    assert c.log_format == "json" and c.engine_nice == 0
    assert c.defaults == Policy(max_sockets=100, max_memory=2 << 30)
    kernel, fast = c.nsms
    assert (kernel.name, kernel.congestion_control, kernel.bandwidth) == ("kernel", "reno", 0)
    assert (fast.congestion_control, fast.bandwidth) == ("bbr", 500_000_000)
    assert fast.sysctls == (("net.ipv4.tcp_wmem", "4096 16384 4194304"), ("net.core.somaxconn", "4096"))
    web, db = c.tenants
    # A tenant's policy is the [defaults] with its own keys on top.
    assert web.nsm == "fast"
    assert web.policy == Policy(
        rate_tx=200_000_000, rate_rx=0, weight=2, max_sockets=100, max_memory=512 << 20
    )
    assert db.nsm == "kernel" and db.policy == c.defaults
    assert c.dns_hosts == (("db.example", "198.19.1.1"),)


def test_default_config_is_the_no_file_path(tmp_path: Path) -> None:
    assert load_config(None) == Config()
    assert load_config(write(tmp_path, "")) == Config()
    c = Config()
    assert [n.name for n in c.nsms] == ["kernel"] and c.tenants == ()
    assert c.api_socket == config.DAEMON_SOCKET and c.api_group is None
    assert c.metrics_listen == ("127.0.0.1", 9464) and c.log_format == "text"
    assert c.engine_nice == -10
    assert load_config(write(tmp_path, '[daemon]\nmetrics_listen = ""\n')).metrics_listen is None


# (config text, line, key path, words the reason must contain)
BAD = [
    (
        '[[nsm]]\nname = "kernel"\n[[nsm]]\nname = "b"\ncongestion_control = "vegas"\n',
        5,
        "nsm[1].congestion_control",
        ["'vegas'", "reno", "bbr", "cubic"],
    ),
    ('[daemon]\nlog_format = "xml"\n', 2, "daemon.log_format", ["'xml'", '"json"']),
    ('[daemon]\n\nmetrics_listen = "localhost"\n', 3, "daemon.metrics_listen", ["host:port"]),
    ('[daemon]\nmetrics_listen = "127.0.0.1:99999"\n', 2, "daemon.metrics_listen", ["1-65535"]),
    ('[daemon]\napi_socket = "relative.sock"\n', 2, "daemon.api_socket", ["absolute"]),
    ("[daemon]\nengine_nice = -30\n", 2, "daemon.engine_nice", ["-30", "-20 to 19"]),
    ("[daemon]\nengine_nice = true\n", 2, "daemon.engine_nice", ["True", "-20 to 19"]),
    (
        '[daemon]\napi_group = "no-such-group-nk"\n',
        2,
        "daemon.api_group",
        ["groupadd no-such-group-nk", "root-only"],
    ),
    ('[defaults]\nrate_tx = "20 0Mbit"\n', 2, "defaults.rate_tx", ["not a rate", "200Mbit"]),
    ("[defaults]\nweight = 0\n", 2, "defaults.weight", ["1 to 1000"]),
    ("[defaults]\nmax_sockets = 2000000\n", 2, "defaults.max_sockets", ["0 to 1048576"]),
    ('[defaults]\nmax_memory = "lots"\n', 2, "defaults.max_memory", ["not a size", "512MiB"]),
    ("[defaults]\nburst = 3\n", 2, "defaults.burst", ["unknown key", "rate_tx"]),
    ('[[nsm]]\nname = "k"\nbandwidth = "fast"\n', 3, "nsm[0].bandwidth", ["not a rate"]),
    (
        '[[nsm]]\nname = "k"\n[nsm.sysctl]\n"net.core.nope" = 1\n',
        4,
        'nsm[0].sysctl."net.core.nope"',
        ["no sysctl"],
    ),
    ('[[nsm]]\nname = "k"\n[nsm.sysctl]\n"kernel.panic" = 1\n', 4, 'nsm[0].sysctl."kernel.panic"', ["net.*"]),
    (
        '[[nsm]]\nname = "k"\nsysctl = { "net.ipv4.tcp_congestion_control" = "bbr" }\n',
        3,
        'nsm[0].sysctl."net.ipv4.tcp_congestion_control"',
        ["congestion_control ="],
    ),
    ('[[nsm]]\nname = "k"\ncolour = "red"\n', 3, "nsm[0].colour", ["unknown key", "congestion_control"]),
    ('[[nsm]]\nname = "Kernel!"\n', 2, "nsm[0].name", ["invalid NSM name"]),
    ('[[nsm]]\nname = "q"\nkind = "quic"\n', 3, "nsm[0].kind", ["unknown kind 'quic'", "lwip"]),
    (
        '[[nsm]]\nname = "lw"\nkind = "lwip"\ncongestion_control = "reno"\n',
        3,
        "nsm[0].kind",
        ["lwip NSM has no congestion_control", 'kind = "kernel"'],
    ),
    ('[[nsm]]\nname = "a"\n[[nsm]]\nname = "a"\n', 4, "nsm[1].name", ["twice"]),
    ('[[tenant]]\nname = "web"\nnsm = "nope"\n', 3, "tenant[0].nsm", ["no NSM named 'nope'", "kernel"]),
    ('[[tenant]]\nname = "web"\n\nrate_rx = "1 Gbyte"\n', 4, "tenant[0].rate_rx", ["not a rate"]),
    ('[[tenant]]\nname = "Web Server"\n', 2, "tenant[0].name", ["invalid tenant name"]),
    ('[network]\nipv4_subnet = "198.18.0.0/24"\n', 2, "network.ipv4_subnet", ["too small"]),
    ('[dns]\nhosts = { "a.example" = "nowhere" }\n', 2, 'dns.hosts."a.example"', ["not an IP address"]),
    ("[oops]\n", 1, "oops", ["unknown section", "daemon"]),
    ('[network]\nroutes = ["198.18.4.0/24"]\n', 2, "network.routes[0]", ["overlaps this host's own subnet"]),
    ('[network]\nroutes = ["0.0.0.0/0"]\n', 2, "network.routes[0]", ["default route"]),
    ('[network]\nroutes = ["nowhere"]\n', 2, "network.routes[0]", ["does not appear to be"]),
    ('[dns]\nzone = "a..b"\n', 2, "dns.zone", ["not a DNS zone"]),
    ('[dns]\nzone = "x.netkernel"\n', 2, "dns.zone", ["NetKernel's own"]),
    (
        '[dns]\nzone = "h1.lab"\nforward = { "h1.lab" = "198.20.0.1" }\n',
        3,
        'dns.forward."h1.lab"',
        ["own zone"],
    ),
    ('[dns]\nforward = { "h2.lab" = "h2" }\n', 2, 'dns.forward."h2.lab"', ["not an IP address"]),
]


def test_routes_zone_and_forwarded_zones() -> None:
    c = parse_config(
        {
            "network": {"ipv4_subnet": "198.20.0.0/20", "routes": ["198.20.16.0/20", "fd6e:6b02::/64"]},
            "dns": {"zone": "H1.Lab.", "forward": {"h2.lab": "198.20.16.1"}},
        }
    )
    assert [str(r) for r in c.routes] == ["198.20.16.0/20", "fd6e:6b02::/64"]
    assert c.dns_zone == "h1.lab" and c.dns_forward == (("h2.lab", "198.20.16.1"),)
    assert Config().routes == () and Config().dns_zone is None


@pytest.mark.parametrize(("text", "line", "key", "words"), BAD, ids=[b[2] for b in BAD])
def test_bad_config_names_file_line_key_and_reason(
    tmp_path: Path, text: str, line: int, key: str, words: list[str]
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    message = str(e.value)
    assert message.startswith(f"config file {path}, line {line}: {key}: "), message
    for word in words:
        assert word in message, message


def test_an_lwip_nsm_is_configuration_only(tmp_path: Path) -> None:
    c = load_config(
        write(
            tmp_path,
            '[[nsm]]\nname = "kernel"\n[[nsm]]\nname = "lw"\nkind = "lwip"\n'
            'bandwidth = "1Gbit"\n[[tenant]]\nname = "web"\nnsm = "lw"\n',
        )
    )
    assert [(n.name, n.kind) for n in c.nsms] == [("kernel", "kernel"), ("lw", "lwip")]
    assert c.nsms[1].bandwidth == 1_000_000_000 and c.tenants[0].nsm == "lw"


def test_syntax_error_has_line_and_column(tmp_path: Path) -> None:
    path = write(tmp_path, "[network]\nipv4_subnet = 1 2\n")
    with pytest.raises(ConfigError, match=r"invalid TOML.*line 2, column") as e:
        load_config(path)
    assert str(e.value).startswith(f"config file {path}: invalid TOML")
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.toml")


def test_api_group_must_exist_and_is_kept(tmp_path: Path) -> None:
    group = grp.getgrgid(os.getgid()).gr_name
    assert load_config(write(tmp_path, f'[daemon]\napi_group = "{group}"\n')).api_group == group


def test_rates() -> None:
    assert parse_rate("200Mbit") == 200_000_000
    assert parse_rate("1.5Gbit") == 1_500_000_000
    assert parse_rate("500M") == 500_000_000
    assert parse_rate("100kbit/s") == 100_000
    assert parse_rate("0") == 0 and parse_rate(0) == 0
    assert parse_rate(12345) == 12345
    for bad in ("20 0Mbit", "200MB", "fast", "-1", "", "1e9"):
        with pytest.raises(ValueError, match="is not a rate; use e.g. 200Mbit, 1.5Gbit"):
            parse_rate(bad)
    with pytest.raises(ValueError, match="negative"):
        parse_rate(-5)
    assert format_rate(200_000_000) == "200Mbit" and format_rate(1_500_000_000) == "1.5Gbit"
    assert format_rate(0) == "unlimited"


def test_sizes() -> None:
    assert parse_size("2GiB") == 2 << 30
    assert parse_size("512MiB") == 512 << 20
    assert parse_size("64K") == 64 << 10
    assert parse_size("1GB") == 10**9
    assert parse_size("4096") == 4096 == parse_size(4096)
    for bad in ("lots", "1iB", "2 GiB x"):
        with pytest.raises(ValueError, match="is not a size"):
            parse_size(bad)


def test_policy_changes_and_caps() -> None:
    p = policy_with(Policy(), {"rate_tx": "200Mbit", "weight": "3", "max_memory": "512MiB"})
    assert p == Policy(rate_tx=200_000_000, weight=3, max_memory=512 << 20)
    assert p.engine_args() == (
        f"rate_tx=200000000 rate_rx=0 weight=3 max_sockets={config.ENGINE_SLOTS} max_memory=536870912 shm=1 "
        "tenant_cc=0"
    )
    # More sockets than the engine's slots could never open: capped there.
    assert policy_with(Policy(), {"max_sockets": 5000}).max_sockets == 5000
    assert policy_with(Policy(), {"max_sockets": 200_000}).max_sockets == config.ENGINE_SLOTS
    # 0: no limit but the slots, as 0 means unlimited for rates and memory.
    assert policy_with(Policy(), {"max_sockets": 0}).max_sockets == 0
    with pytest.raises(ValueError, match=r"^weight: 1001 is not a valid weight; use a whole number from 1 "):
        policy_with(Policy(), {"weight": 1001})
    with pytest.raises(ValueError, match="unknown policy key 'burst'"):
        policy_with(Policy(), {"burst": 1})
    # The shared-memory switch: TOML booleans, on/off from the command line.
    assert policy_with(Policy(), {"shm": False}).shm is False
    assert policy_with(Policy(), {"shm": "off"}).engine_args().endswith("shm=0 tenant_cc=0")
    with pytest.raises(ValueError, match=r"^shm: 'sometimes' is not a switch; use true or false"):
        policy_with(Policy(), {"shm": "sometimes"})


def test_locate_key() -> None:
    text = FULL
    lines = text.splitlines()
    line = locate_key(text, ("nsm", 1, "bandwidth"))
    assert line is not None and lines[line - 1].startswith("bandwidth")
    line = locate_key(text, ("nsm", 1, "sysctl", "net.core.somaxconn"))
    assert line is not None and lines[line - 1].startswith('"net.core.somaxconn"')
    line = locate_key(text, ("tenant", 1, "name"))
    assert line is not None and lines[line - 1] == 'name = "db"'
    # A key that is not written: the nearest table that is.
    line = locate_key(text, ("tenant", 1, "weight"))
    assert line is not None and lines[line - 1] == "[[tenant]]" and lines[line] == 'name = "db"'
    assert format_key_path(("nsm", 1, "sysctl", "net.core.somaxconn")) == 'nsm[1].sysctl."net.core.somaxconn"'


def test_example_config_is_valid() -> None:
    example = Path(__file__).resolve().parents[2] / "examples" / "netkernel.toml"
    c = load_config(example)
    assert [n.name for n in c.nsms] == ["kernel", "bbr"]
    assert [(t.name, t.nsm) for t in c.tenants] == [("web", "kernel"), ("batch", "bbr")]
