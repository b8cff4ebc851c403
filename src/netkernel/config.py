"""Configuration: an embedded default, optionally replaced by a TOML file of the same shape.

    [network]
    ipv4_subnet = "198.18.0.0/15"
    ipv6_prefix = "fd6e:6b00::/64"

    [[nsm]]
    name = "kernel"
    kind = "kernel"

    [dns]
    hosts = { "db.example" = "198.19.1.1" }

Addresses derived from the subnets (see ``Config``): the bridge takes host 1, NSM ``i`` takes
host ``2+i``, tenant ``N`` (1, 2, …) takes ``network + 256 + N`` (198.18.1.N) and
``prefix + 0x1_0000 + N`` (fd6e:6b00::1:N). Test peers live in 198.19.0.0/16 and
fd6e:6b00::ff:0/112, which tenants never get.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError, InstallError

# Runtime locations. Fixed paths: the C engine and GuestLib default to the same ones.
RUN_DIR = Path("/run/netkernel")
DAEMON_SOCKET = RUN_DIR / "daemon.sock"
ENGINE_SOCKET = RUN_DIR / "engine.sock"
ADMIN_SOCKET = RUN_DIR / "admin.sock"
PID_FILE = RUN_DIR / "daemon.pid"
ENGINE_PID_FILE = RUN_DIR / "engine.pid"
LOCK_FILE = RUN_DIR / "daemon.lock"
TENANTS_DIR = RUN_DIR / "tenants"
# Outside RUN_DIR so the log of a failed or stopped daemon survives `netkernel down`.
LOG_FILE = Path("/var/log/netkernel.log")
NETNS_DIR = Path("/run/netns")

# Names of everything we create, so `down` can find leftovers of a crashed daemon.
BRIDGE = "nk0"
NSM_NETNS_PREFIX = "nk-nsm-"
TENANT_NETNS_PREFIX = "nk-t-"
NSM_VETH_PREFIX = "nkn-"

# Interface names are at most 15 bytes: "nkn-" + 11.
_NSM_NAME_RE = re.compile(r"^[a-z][a-z0-9]{0,10}$")
_TENANT_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")
NSM_KINDS = ("kernel",)
# First tenant address is network + 256 + 1; the last one must stay below the peer range.
TENANT_OFFSET_V4 = 256
TENANT_OFFSET_V6 = 0x1_0000
MAX_TENANTS = 250


def libdir() -> Path:
    """Where libnetkernel.so and netkernel-engine live (NETKERNEL_LIBDIR overrides)."""
    override = os.environ.get("NETKERNEL_LIBDIR")
    return Path(override) if override else Path(__file__).parent / "_lib"


def engine_binary() -> Path:
    path = libdir() / "netkernel-engine"
    if not os.access(path, os.X_OK):
        raise InstallError(
            f"engine binary not found at {path} (reinstall with `pip install .`, "
            "or set NETKERNEL_LIBDIR to a build directory)"
        )
    return path


def guestlib() -> Path:
    path = libdir() / "libnetkernel.so"
    if not path.is_file():
        raise InstallError(
            f"GuestLib not found at {path} (reinstall with `pip install .`, "
            "or set NETKERNEL_LIBDIR to a build directory)"
        )
    return path


def check_nsm_name(name: str) -> str:
    if not _NSM_NAME_RE.match(name):
        raise ConfigError(
            f"invalid NSM name {name!r}: use 1-11 lowercase letters and digits, starting with a letter"
        )
    return name


def check_tenant_name(name: str) -> str:
    if not _TENANT_NAME_RE.match(name):
        raise ConfigError(
            f"invalid tenant name {name!r}: use 1-32 characters from a-z, 0-9, '-', '_', "
            "starting with a letter or digit"
        )
    return name


@dataclass(frozen=True)
class NSMConfig:
    name: str
    kind: str = "kernel"


@dataclass(frozen=True)
class Config:
    ipv4_subnet: ipaddress.IPv4Network = ipaddress.IPv4Network("198.18.0.0/15")
    ipv6_prefix: ipaddress.IPv6Network = ipaddress.IPv6Network("fd6e:6b00::/64")
    nsms: tuple[NSMConfig, ...] = (NSMConfig("kernel"),)
    dns_hosts: tuple[tuple[str, str], ...] = field(default=())

    # -- derived addresses -------------------------------------------------------------
    @property
    def bridge_ipv4(self) -> ipaddress.IPv4Address:
        return self.ipv4_subnet.network_address + 1

    @property
    def bridge_ipv6(self) -> ipaddress.IPv6Address:
        return self.ipv6_prefix.network_address + 1

    def nsm(self, name: str) -> NSMConfig | None:
        return next((n for n in self.nsms if n.name == name), None)

    def nsm_ipv4(self, index: int) -> ipaddress.IPv4Address:
        return self.ipv4_subnet.network_address + 2 + index

    def nsm_ipv6(self, index: int) -> ipaddress.IPv6Address:
        return self.ipv6_prefix.network_address + 2 + index

    def tenant_ipv4(self, n: int) -> ipaddress.IPv4Address:
        return self.ipv4_subnet.network_address + TENANT_OFFSET_V4 + n

    def tenant_ipv6(self, n: int) -> ipaddress.IPv6Address:
        return self.ipv6_prefix.network_address + TENANT_OFFSET_V6 + n


_TOP_KEYS = {"network", "nsm", "dns"}


def load_config(path: Path | None) -> Config:
    """The default config, or the one in ``path`` (TOML). Raises ConfigError naming the file."""
    if path is None:
        return Config()
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} not found") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path}: invalid TOML: {e}") from None
    except OSError as e:
        raise ConfigError(f"config file {path}: {e.strerror}") from None
    try:
        return parse_config(data)
    except ConfigError as e:
        raise ConfigError(f"config file {path}: {e}") from None


def _table(data: dict[str, Any], key: str) -> dict[str, Any]:
    value = data.get(key, {})
    if not isinstance(value, dict):
        raise ConfigError(f"[{key}] must be a table")
    return value


def parse_config(data: dict[str, Any]) -> Config:
    unknown = set(data) - _TOP_KEYS
    if unknown:
        raise ConfigError(f"unknown section(s): {', '.join(sorted(unknown))} (known: network, nsm, dns)")
    default = Config()

    net = _table(data, "network")
    extra = set(net) - {"ipv4_subnet", "ipv6_prefix"}
    if extra:
        raise ConfigError(f"unknown key(s) in [network]: {', '.join(sorted(extra))}")
    try:
        v4 = ipaddress.IPv4Network(net.get("ipv4_subnet", str(default.ipv4_subnet)))
        v6 = ipaddress.IPv6Network(net.get("ipv6_prefix", str(default.ipv6_prefix)))
    except (ValueError, TypeError) as e:
        raise ConfigError(f"[network]: {e}") from None
    if v4.prefixlen > 22:
        raise ConfigError(f"[network] ipv4_subnet {v4} is too small (need /22 or larger)")
    if v6.prefixlen > 96:
        raise ConfigError(f"[network] ipv6_prefix {v6} is too small (need /96 or larger)")

    raw_nsms = data.get("nsm", [{"name": "kernel"}])
    if not isinstance(raw_nsms, list) or not raw_nsms:
        raise ConfigError("[[nsm]] must list at least one NSM")
    nsms: list[NSMConfig] = []
    for item in raw_nsms:
        if not isinstance(item, dict) or "name" not in item:
            raise ConfigError("each [[nsm]] needs a name")
        extra = set(item) - {"name", "kind"}
        if extra:
            raise ConfigError(f"unknown key(s) in [[nsm]] {item['name']!r}: {', '.join(sorted(extra))}")
        name = check_nsm_name(str(item["name"]))
        kind = str(item.get("kind", "kernel"))
        if kind not in NSM_KINDS:
            raise ConfigError(f"NSM {name!r}: unknown kind {kind!r} (known: {', '.join(NSM_KINDS)})")
        if any(n.name == name for n in nsms):
            raise ConfigError(f"NSM {name!r} is listed twice")
        nsms.append(NSMConfig(name, kind))

    dns = _table(data, "dns")
    extra = set(dns) - {"hosts"}
    if extra:
        raise ConfigError(f"unknown key(s) in [dns]: {', '.join(sorted(extra))}")
    hosts = dns.get("hosts", {})
    if not isinstance(hosts, dict):
        raise ConfigError("[dns] hosts must be a table of name = address")
    pairs: list[tuple[str, str]] = []
    for name, addr in hosts.items():
        try:
            ipaddress.ip_address(addr)
        except (ValueError, TypeError):
            raise ConfigError(f"[dns] hosts: {name!r} = {addr!r} is not an IP address") from None
        pairs.append((name.lower().rstrip("."), str(addr)))

    return Config(ipv4_subnet=v4, ipv6_prefix=v6, nsms=tuple(nsms), dns_hosts=tuple(pairs))
