"""Configuration: an embedded default, optionally replaced by a TOML file.

The schema, with every key, is documented in docs/configuration.md and exemplified in
examples/netkernel.toml; ``Config()`` is the no-file default (one kernel NSM "kernel").

Addresses derived from the subnets (see ``Config``): the bridge takes host 1, NSM index ``i``
takes host ``2+i``, tenant ``N`` (1, 2, …) takes ``network + 256 + N`` (198.18.1.N) and
``prefix + 0x1_0000 + N`` (fd6e:6b00::1:N). Test peers live in 198.19.0.0/16 and
fd6e:6b00::ff:0/112, which tenants never get.

Errors name the file, the line, the key path (``nsm[1].congestion_control``), the reason and
what is allowed: the operator should not have to read this module to fix a config.
"""

from __future__ import annotations

import grp
import importlib
import ipaddress
import json
import os
import re
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields, replace
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
# What outlives a daemon and a reboot: which host uids each tenant name was given.
STATE_DIR = Path("/var/lib/netkernel")

# Names of everything we create, so `down` can find leftovers of a crashed daemon.
BRIDGE = "nk0"
NSM_NETNS_PREFIX = "nk-nsm-"
TENANT_NETNS_PREFIX = "nk-t-"
NSM_VETH_PREFIX = "nkn-"

# Interface names are at most 15 bytes: "nkn-" + 11.
_NSM_NAME_RE = re.compile(r"^[a-z][a-z0-9]{0,10}$")
_TENANT_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")
# kernel: the Linux stack in the NSM's namespace, driven by the engine in-process.
# lwip: lwIP in a process of its own (netkernel-lwip) on a TAP device, over ServiceLib.
NSM_KINDS = ("kernel", "lwip")
# First tenant address is network + 256 + 1; the last one must stay below the peer range.
TENANT_OFFSET_V4 = 256
TENANT_OFFSET_V6 = 0x1_0000
MAX_TENANTS = 250
# The port of each tenant's relay (relay.py) on its loopback: outside the ephemeral range
# (32768-60999), so never one the kernel picks for a program.
RELAY_PORT = 61001
# NSM index i takes host 2+i, which must stay below the first tenant (host 257).
MAX_NSMS = 250
LOG_FORMATS = ("text", "json")
DEFAULT_METRICS_LISTEN = ("127.0.0.1", 9464)
DEFAULT_ENGINE_NICE = -10  # see Config.engine_nice
# A Unix socket path must fit sockaddr_un.sun_path (108 bytes with the NUL).
_SUN_PATH_MAX = 107
CONGESTION_CONTROL_FILE = Path("/proc/sys/net/ipv4/tcp_available_congestion_control")


def _abi_constant(name: str, fallback: int) -> int:
    """A constant generated from include/netkernel/abi.h; a source tree never built lacks
    the generated module, and then the header's value below stands in."""
    try:
        return int(getattr(importlib.import_module("netkernel._abi"), name))
    except (ImportError, AttributeError):
        return fallback


# Socket slots in a tenant region (NK_DEFAULT_SLOTS) and the most a region may have
# (NK_MAX_SLOTS). max_sockets above the slots is capped there: more could never open.
ENGINE_SLOTS = _abi_constant("NK_DEFAULT_SLOTS", 131008)
MAX_SLOTS = _abi_constant("NK_MAX_SLOTS", 1 << 20)
MAX_WEIGHT = 1000
# A tenant's processes: memory (their cgroup's limit) and tasks. A fork bomb or a memory hog
# stops there, and only that tenant's programs feel it.
DEFAULT_PROCESS_MEMORY = 4 << 30
DEFAULT_PROCESSES = 4096
CGROUP_POLICY = ("max_process_memory", "max_processes")


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


def lwip_binary() -> Path:
    path = libdir() / "netkernel-lwip"
    if not os.access(path, os.X_OK):
        raise InstallError(
            f"the lwIP NSM (netkernel-lwip) is not at {path}: it is built when liblwip-dev is "
            "installed (apt-get install liblwip-dev, then pip install . again)"
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


_ZONE_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*$")


def check_zone(name: object) -> str:
    """A DNS zone such as ``h1.lab``: lower-case labels, no trailing dot."""
    if not isinstance(name, str) or len(name) > 200 or not _ZONE_RE.match(name.lower().rstrip(".")):
        raise ValueError(f"{name!r} is not a DNS zone; use letters, digits and '-', e.g. \"h1.lab\"")
    zone = name.lower().rstrip(".")
    if zone == "netkernel" or zone.endswith(".netkernel"):
        raise ValueError(f"{name!r}: the zone netkernel is NetKernel's own (<tenant>.tenant.netkernel)")
    return zone


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


# -- values: rates, sizes, policy ------------------------------------------------------------
# Each parser takes what TOML, the CLI or the JSON API gives (int or str) and raises
# ValueError whose text is the reason plus what is allowed; callers add where it came from.

_RATE_RE = re.compile(r"^(\d+(?:\.\d+)?) ?([kmgt]?)(bit|bit/s|bps)?$", re.IGNORECASE)
_RATE_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}
RATE_HINT = "use e.g. 200Mbit, 1.5Gbit, 500M (bits per second), 0 for unlimited"

_SIZE_RE = re.compile(r"^(\d+(?:\.\d+)?) ?(?:([kmgt])(i?b)?|b)?$", re.IGNORECASE)
_SIZE_POWERS = {"k": 1, "m": 2, "g": 3, "t": 4}
SIZE_HINT = "use e.g. 512MiB, 2GiB, 1048576 (bytes), 0 for unlimited"


def parse_rate(value: object) -> int:
    """Bits per second from ``200Mbit``, ``1.5Gbit``, ``500M``, ``0`` or an int (0 = unlimited).

    Decimal prefixes as tc uses for rates: k = 1000."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise ValueError(f"{value} is negative; {RATE_HINT}")
        return value
    m = _RATE_RE.match(value.strip()) if isinstance(value, str) else None
    if m is None:
        raise ValueError(f"{value!r} is not a rate; {RATE_HINT}")
    number, prefix, _ = m.groups()
    scaled = float(number) * _RATE_UNITS[prefix.lower()]
    if scaled >= 2**63:
        raise ValueError(f"{value!r} is too large; {RATE_HINT}")
    bits = int(scaled)
    if bits == 0 and float(number) != 0:
        raise ValueError(f"{value!r} is below 1 bit/s; {RATE_HINT}")
    return bits


def parse_size(value: object) -> int:
    """Bytes from ``512MiB``, ``2GiB``, ``64K``, ``1048576`` or an int (0 = unlimited).

    K/M/G/T and KiB/MiB/GiB/TiB are powers of 1024 (as ip and tc read sizes); KB/MB/GB/TB
    are powers of 1000."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise ValueError(f"{value} is negative; {SIZE_HINT}")
        return value
    m = _SIZE_RE.match(value.strip()) if isinstance(value, str) else None
    if m is None:
        raise ValueError(f"{value!r} is not a size; {SIZE_HINT}")
    number, prefix, suffix = m.groups()
    base = 1000 if suffix is not None and suffix.lower() == "b" else 1024
    scaled = float(number) * (base ** _SIZE_POWERS[prefix.lower()] if prefix else 1)
    if scaled >= 2**63:
        raise ValueError(f"{value!r} is too large; {SIZE_HINT}")
    return int(scaled)


def _whole_number(value: object, what: str, low: int, high: int) -> int:
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ValueError(f"{value!r} is not a valid {what}; use a whole number from {low} to {high}")
    return value


def parse_weight(value: object) -> int:
    return _whole_number(value, "weight", 1, MAX_WEIGHT)


def parse_max_sockets(value: object) -> int:
    """0 (no limit but the tenant's slots) or 1..MAX_SLOTS, capped at the engine's slots per
    tenant, since no more can ever open."""
    return min(_whole_number(value, "socket limit", 0, MAX_SLOTS), ENGINE_SLOTS)


def parse_max_processes(value: object) -> int:
    """Tasks in the tenant's cgroup (pids.max); 0 is no limit."""
    return _whole_number(value, "process limit", 0, 4194304)


def parse_switch(value: object) -> bool:
    """true/false (TOML), or on/off, yes/no, 1/0 as text (CLI, API)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("on", "yes", "true", "1"):
        return True
    if isinstance(value, str) and value.strip().lower() in ("off", "no", "false", "0"):
        return False
    raise ValueError(f"{value!r} is not a switch; use true or false (on/off on the command line)")


def format_rate(bits: int | None) -> str:
    """``200Mbit``, ``1.5Gbit``; 0 is ``unlimited``."""
    if bits is None:
        return "-"
    if bits == 0:
        return "unlimited"
    for unit, scale in (("Gbit", 10**9), ("Mbit", 10**6), ("kbit", 10**3)):
        if bits >= scale:
            return f"{bits / scale:.4g}{unit}"
    return f"{bits}bit"


def format_size(n: int | None, zero: str = "0B") -> str:
    if n is None:
        return "-"
    if n == 0:
        return zero
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{n}B" if unit == "B" else f"{value:.4g}{unit}"
        value /= 1024
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class Policy:
    """A tenant's policy, enforced by the engine. Rates in bits/s and memory in bytes, 0
    meaning unlimited; weight shares a bottleneck between tenants (not flows)."""

    rate_tx: int = 0
    rate_rx: int = 0
    weight: int = 1
    max_sockets: int = ENGINE_SLOTS  # 0: no limit but the slots
    max_memory: int = 0
    # Connections to colocated tenants over shared memory; both ends' tenants must allow it.
    shm: bool = True
    # Tenant-level congestion control (engine: tenant_cc.c): at a bottleneck between hosts the
    # tenant's connections together take a share by weight, however many there are.
    tenant_cc: bool = False
    # The tenant's cgroup (cgroups.py): memory of its processes, and how many there may be.
    max_process_memory: int = DEFAULT_PROCESS_MEMORY
    max_processes: int = DEFAULT_PROCESSES

    def engine_args(self) -> str:
        """``key=value ...`` for the engine's ``tenant-set`` (the cgroup's keys are not its)."""
        return " ".join(
            f"{f.name}={int(getattr(self, f.name))}" for f in fields(self) if f.name not in CGROUP_POLICY
        )

    def describe(self) -> str:
        return (
            f"rate_tx={format_rate(self.rate_tx)} rate_rx={format_rate(self.rate_rx)} "
            f"weight={self.weight} max_sockets={self.max_sockets or 'unlimited'} "
            f"max_memory={format_size(self.max_memory, zero='unlimited')} "
            f"shm={'on' if self.shm else 'off'} "
            f"tenant_cc={'on' if self.tenant_cc else 'off'} "
            f"max_process_memory={format_size(self.max_process_memory, zero='unlimited')} "
            f"max_processes={self.max_processes or 'unlimited'}"
        )


POLICY_PARSERS: dict[str, Callable[[object], int | bool]] = {
    "rate_tx": parse_rate,
    "rate_rx": parse_rate,
    "weight": parse_weight,
    "max_sockets": parse_max_sockets,
    "max_memory": parse_size,
    "shm": parse_switch,
    "tenant_cc": parse_switch,
    "max_process_memory": parse_size,
    "max_processes": parse_max_processes,
}


def policy_with(base: Policy, changes: dict[str, object]) -> Policy:
    """``base`` with ``changes`` (raw values) parsed; ValueError names the offending key."""
    parsed: dict[str, Any] = {}
    for key, raw in changes.items():
        parser = POLICY_PARSERS.get(key)
        if parser is None:
            raise ValueError(f"unknown policy key {key!r} (known: {', '.join(POLICY_PARSERS)})")
        try:
            parsed[key] = parser(raw)
        except ValueError as e:
            raise ValueError(f"{key}: {e}") from None
    return replace(base, **parsed)


# -- NSM settings ------------------------------------------------------------------------------

# Set by NetKernel in every NSM namespace; an operator override would break what the note says.
MANAGED_SYSCTLS = {
    "net.ipv4.ip_nonlocal_bind": "NetKernel keeps it 0: an NSM binds only its tenants' addresses",
    "net.ipv4.conf.all.arp_announce": "NetKernel keeps it 2: tenant move relies on ARP "
    "requests carrying the NSM's own address",
    "net.ipv4.tcp_congestion_control": 'set it with congestion_control = "..." instead',
}
_SYSCTL_KEY_RE = re.compile(r"^net(\.[A-Za-z0-9_-]+)+$")


def available_congestion_control() -> list[str]:
    try:
        return CONGESTION_CONTROL_FILE.read_text().split()
    except OSError:
        return []


def check_congestion_control(name: object) -> str:
    available = available_congestion_control()
    if not isinstance(name, str) or name not in available:
        raise ValueError(
            f"{name!r} is not offered by this kernel; use one of: {', '.join(available)} "
            f"(from {CONGESTION_CONTROL_FILE}; `modprobe tcp_NAME` adds more)"
        )
    return name


def check_sysctl(key: str, value: object) -> tuple[str, str]:
    """A ``net.*`` sysctl for an NSM namespace, as (key, value-as-written-to-/proc)."""
    if not _SYSCTL_KEY_RE.match(key):
        raise ValueError(
            f"{key!r} is not a net.* sysctl; NSM namespaces take only network "
            'sysctls, e.g. "net.ipv4.tcp_wmem"'
        )
    if key in MANAGED_SYSCTLS:
        raise ValueError(f"{key} cannot be set here: {MANAGED_SYSCTLS[key]}")
    parts = key.split(".")
    # The NSM's own eth0 may be absent from the root namespace, where this check looks.
    per_eth0 = len(parts) > 3 and parts[2] in ("conf", "neigh") and parts[3] == "eth0"
    if not per_eth0 and not os.path.exists(os.path.join("/proc/sys", *parts)):
        raise ValueError(f"no sysctl {key} on this kernel (see `sysctl -a | grep '^net\\.'`)")
    if isinstance(value, bool):
        text = "1" if value else "0"
    elif isinstance(value, int | str):
        text = str(value)
    else:
        raise ValueError(f'value of {key} must be a string or a whole number, e.g. "4096 16384 4194304"')
    if "\n" in text:
        raise ValueError(f"value of {key} must be one line")
    return key, text


# -- the config ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class NSMConfig:
    name: str
    kind: str = "kernel"
    congestion_control: str | None = None  # None: the kernel's default
    bandwidth: int = 0  # bits/s of the uplink shared by weight; 0 = not set
    sysctls: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class TenantConfig:
    name: str
    nsm: str
    policy: Policy
    # Host paths its programs may write (rw) or read where they are otherwise private (ro).
    rw: tuple[Path, ...] = ()
    ro: tuple[Path, ...] = ()


@dataclass(frozen=True)
class Config:
    ipv4_subnet: ipaddress.IPv4Network = ipaddress.IPv4Network("198.18.0.0/15")
    ipv6_prefix: ipaddress.IPv6Network = ipaddress.IPv6Network("fd6e:6b00::/64")
    nsms: tuple[NSMConfig, ...] = (NSMConfig("kernel"),)
    dns_hosts: tuple[tuple[str, str], ...] = field(default=())
    # Prefixes beyond this host that its NSMs may reach through it (the host routes them, e.g.
    # other NetKernel hosts' subnets across a fabric); empty: the NSMs reach only the bridge.
    routes: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    # The host's own DNS zone (``<tenant>.<zone>`` answers like ``<tenant>.tenant.netkernel``)
    # and other hosts' zones with the DNS server that answers for each.
    dns_zone: str | None = None
    dns_forward: tuple[tuple[str, str], ...] = ()
    api_socket: Path = DAEMON_SOCKET
    api_group: str | None = None  # members may use the API too (socket 0660)
    metrics_listen: tuple[str, int] | None = DEFAULT_METRICS_LISTEN  # None: no endpoint
    log_format: str = "text"
    # The engine does, for every tenant, the work softirq and the syscall path do natively;
    # at equal CPU weight with the tenants' own processes it gets a third of two cores when a
    # server and its load generator run beside it (docs/operations.md).
    engine_nice: int = DEFAULT_ENGINE_NICE
    defaults: Policy = Policy()
    tenants: tuple[TenantConfig, ...] = ()

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


# -- errors that know where they are --------------------------------------------------------------

KeyPath = tuple[str | int, ...]
_BARE_KEY_RE = re.compile(r"^[A-Za-z0-9_-]+$")


def format_key_path(path: KeyPath) -> str:
    """``("nsm", 1, "sysctl", "net.core.somaxconn")`` → ``nsm[1].sysctl."net.core.somaxconn"``."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + (part if _BARE_KEY_RE.match(part) else json.dumps(part))
    return out


class ConfigValueError(ConfigError):
    """A semantic error at a key path; load_config adds the file and the line."""

    def __init__(self, path: KeyPath, reason: str) -> None:
        self.key_path = path
        self.reason = reason
        super().__init__(f"{format_key_path(path)}: {reason}" if path else reason)


def _split_dotted_key(text: str) -> list[str]:
    """``a."b.c".d`` → ``["a", "b.c", "d"]`` (TOML dotted keys; escapes are not needed here)."""
    parts: list[str] = []
    current = ""
    i = 0
    while i < len(text):
        c = text[i]
        if c in "\"'":
            end = text.find(c, i + 1)
            end = len(text) if end < 0 else end
            current += text[i + 1 : end]
            i = end + 1
        elif c == ".":
            parts.append(current.strip())
            current = ""
            i += 1
        else:
            current += c
            i += 1
    parts.append(current.strip())
    return parts


_HEADER_RE = re.compile(r"^\s*(\[\[?)([^\[\]]+)\]\]?\s*(#.*)?$")
_KEY_LINE_RE = re.compile(r"""^\s*((?:"[^"]*"|'[^']*'|[A-Za-z0-9_.\- ])+?)\s*=""")
_INLINE_KEY_RE = re.compile(r"""(?:^|[{,])\s*("[^"]*"|'[^']*'|[A-Za-z0-9_-]+)\s*=""")


def locate_key(text: str, path: KeyPath) -> int | None:
    """Best effort: the line (1-based) where ``path`` is written in TOML ``text``, or that
    of its nearest enclosing table."""
    lines: dict[KeyPath, int] = {}
    array_counts: dict[tuple[str, ...], int] = {}
    table: KeyPath = ()
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        header = _HEADER_RE.match(line)
        if header:
            names = _split_dotted_key(header.group(2))
            resolved: list[str | int] = []
            for i, name in enumerate(names):
                resolved.append(name)
                prefix = tuple(names[: i + 1])
                if i == len(names) - 1 and header.group(1) == "[[":
                    array_counts[prefix] = array_counts.get(prefix, -1) + 1
                if prefix in array_counts:
                    resolved.append(array_counts[prefix])
            table = tuple(resolved)
            lines.setdefault(table, number)
            continue
        key = _KEY_LINE_RE.match(line)
        if key:
            full = table + tuple(_split_dotted_key(key.group(1)))
            lines.setdefault(full, number)
            rest = line[key.end() :]
            if rest.lstrip().startswith("{"):
                for inner in _INLINE_KEY_RE.finditer(rest.lstrip()[1:]):
                    lines.setdefault(full + tuple(_split_dotted_key(inner.group(1))), number)
    for end in range(len(path), 0, -1):
        if path[:end] in lines:
            return lines[path[:end]]
    return None


def load_config(path: Path | None) -> Config:
    """The default config, or the one in ``path`` (TOML). Raises ConfigError naming the file,
    the line and the key."""
    if path is None:
        return Config()
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"config file {path} not found") from None
    except OSError as e:
        raise ConfigError(f"config file {path}: {e.strerror}") from None
    try:
        text = raw.decode()
        data = tomllib.loads(text)
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except tomllib.TOMLDecodeError as e:
        # tomllib's message ends with "(at line L, column C)".
        raise ConfigError(f"config file {path}: invalid TOML: {e}") from None
    except RecursionError:  # tomllib recurses into nested arrays and inline tables
        raise ConfigError(f"config file {path}: invalid TOML: arrays or tables nested too deeply") from None
    try:
        return parse_config(data)
    except ConfigValueError as e:
        line = locate_key(text, e.key_path)
        where = f", line {line}" if line else ""
        raise ConfigError(f"config file {path}{where}: {e}") from None
    except ConfigError as e:
        raise ConfigError(f"config file {path}: {e}") from None


# -- parsing a loaded TOML document -------------------------------------------------------------


def _check_keys(table: dict[str, Any], allowed: tuple[str, ...], path: KeyPath) -> None:
    for key in table:
        if key not in allowed:
            raise ConfigValueError(path + (key,), f"unknown key (allowed here: {', '.join(allowed)})")


def _table(data: dict[str, Any], key: str, path: KeyPath = ()) -> dict[str, Any]:
    value = data.get(key, {})
    if not isinstance(value, dict):
        raise ConfigValueError(path + (key,), f"must be a table ([{format_key_path(path + (key,))}])")
    return value


def _string(table: dict[str, Any], key: str, path: KeyPath, default: str) -> str:
    value = table.get(key, default)
    if not isinstance(value, str):
        raise ConfigValueError(path + (key,), f'must be a string, e.g. {key} = "{default}"')
    return value


def _parse_value(parser: Callable[[Any], Any], value: object, path: KeyPath) -> Any:
    try:
        return parser(value)
    except (ValueError, ConfigError) as e:
        raise ConfigValueError(path, str(e)) from None


def parse_listen(value: str) -> tuple[str, int] | None:
    """``host:port`` or ``[v6]:port`` (an IP address or localhost); "" is None (disabled)."""
    if value == "":
        return None
    m = re.match(r"^\[([0-9A-Fa-f:.]+)\]:(\d+)$", value) or re.match(r"^([^:\[\]]+):(\d+)$", value)
    hint = 'use host:port, e.g. "127.0.0.1:9464" or "[::1]:9464", or "" to disable'
    if m is None:
        raise ValueError(f"{value!r} is not host:port; {hint}")
    host, port = m.group(1), int(m.group(2))
    if host != "localhost":
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise ValueError(f"{host!r} is not an IP address; {hint}") from None
    if not 1 <= port <= 65535:
        raise ValueError(f"port {port} is out of range 1-65535; {hint}")
    return host, port


def _parse_daemon(data: dict[str, Any]) -> dict[str, Any]:
    path: KeyPath = ("daemon",)
    d = _table(data, "daemon")
    _check_keys(d, ("api_socket", "api_group", "metrics_listen", "log_format", "engine_nice"), path)
    out: dict[str, Any] = {}
    sock = _string(d, "api_socket", path, str(DAEMON_SOCKET))
    if not sock.startswith("/") or len(sock.encode()) > _SUN_PATH_MAX:
        raise ConfigValueError(
            path + ("api_socket",), f"{sock!r} must be an absolute path of at most {_SUN_PATH_MAX} bytes"
        )
    out["api_socket"] = Path(sock)
    if "api_group" in d:
        group = _string(d, "api_group", path, "netkernel")
        try:
            grp.getgrnam(group)
        except (KeyError, ValueError):  # ValueError: a NUL in the name
            raise ConfigValueError(
                path + ("api_group",),
                f"no group {group!r} on this host; create it (groupadd {group}) "
                "or remove api_group to keep the API root-only",
            ) from None
        out["api_group"] = group
    listen = _string(d, "metrics_listen", path, "127.0.0.1:9464")
    out["metrics_listen"] = _parse_value(parse_listen, listen, path + ("metrics_listen",))
    fmt = _string(d, "log_format", path, "text")
    if fmt not in LOG_FORMATS:
        raise ConfigValueError(path + ("log_format",), f'{fmt!r} is not a log format; use "text" or "json"')
    out["log_format"] = fmt
    if "engine_nice" in d:
        out["engine_nice"] = _parse_value(
            lambda v: _whole_number(v, "engine_nice", -20, 19), d["engine_nice"], path + ("engine_nice",)
        )
    return out


Route = ipaddress.IPv4Network | ipaddress.IPv6Network


def _parse_routes(net: dict[str, Any], path: KeyPath, own: tuple[Route, Route]) -> tuple[Route, ...]:
    raw = net.get("routes", [])
    if not isinstance(raw, list):
        raise ConfigValueError(path + ("routes",), 'must be a list of prefixes, e.g. ["198.20.0.0/16"]')
    out: list[Route] = []
    for i, item in enumerate(raw):
        try:
            r = ipaddress.ip_network(item) if isinstance(item, str) else None
        except ValueError as e:
            raise ConfigValueError(path + ("routes", i), f'{e}; use a prefix, e.g. "198.20.0.0/16"') from None
        if r is None:
            raise ConfigValueError(path + ("routes", i), f'{item!r} is not a prefix, e.g. "198.20.0.0/16"')
        if r.prefixlen == 0:
            raise ConfigValueError(path + ("routes", i), f"{r} is a default route: list prefixes instead")
        for o in own:
            if r.version == o.version and r.overlaps(o):
                raise ConfigValueError(path + ("routes", i), f"{r} overlaps this host's own subnet {o}")
        out.append(r)
    return tuple(out)


def _parse_network(
    data: dict[str, Any],
) -> tuple[ipaddress.IPv4Network, ipaddress.IPv6Network, tuple[Route, ...]]:
    path: KeyPath = ("network",)
    net = _table(data, "network")
    _check_keys(net, ("ipv4_subnet", "ipv6_prefix", "routes"), path)
    default = Config()
    try:
        v4 = ipaddress.IPv4Network(_string(net, "ipv4_subnet", path, str(default.ipv4_subnet)))
    except ValueError as e:
        raise ConfigValueError(path + ("ipv4_subnet",), f'{e}; use e.g. "198.18.0.0/15"') from None
    try:
        v6 = ipaddress.IPv6Network(_string(net, "ipv6_prefix", path, str(default.ipv6_prefix)))
    except ValueError as e:
        raise ConfigValueError(path + ("ipv6_prefix",), f'{e}; use e.g. "fd6e:6b00::/64"') from None
    if v4.prefixlen > 22:
        raise ConfigValueError(path + ("ipv4_subnet",), f"{v4} is too small (need /22 or larger)")
    if v6.prefixlen > 96:
        raise ConfigValueError(path + ("ipv6_prefix",), f"{v6} is too small (need /96 or larger)")
    return v4, v6, _parse_routes(net, path, (v4, v6))


def _parse_policy(table: dict[str, Any], base: Policy, path: KeyPath) -> Policy:
    changes: dict[str, Any] = {}
    for key, parser in POLICY_PARSERS.items():
        if key in table:
            changes[key] = _parse_value(parser, table[key], path + (key,))
    return replace(base, **changes)


def _parse_nsm(item: object, path: KeyPath) -> NSMConfig:
    if not isinstance(item, dict):
        raise ConfigValueError(path, "must be a table ([[nsm]])")
    _check_keys(item, ("name", "kind", "congestion_control", "bandwidth", "sysctl"), path)
    if not isinstance(item.get("name"), str):
        raise ConfigValueError(path, 'needs a name (a string), e.g. name = "kernel"')
    name = _parse_value(check_nsm_name, item["name"], path + ("name",))
    kind = _string(item, "kind", path, "kernel")
    if kind not in NSM_KINDS:
        raise ConfigValueError(path + ("kind",), f"unknown kind {kind!r}; use one of: {', '.join(NSM_KINDS)}")
    cc = None
    if "congestion_control" in item:
        cc = _parse_value(
            check_congestion_control, item["congestion_control"], path + ("congestion_control",)
        )
    bandwidth = 0
    if "bandwidth" in item:
        bandwidth = _parse_value(parse_rate, item["bandwidth"], path + ("bandwidth",))
    sysctls: list[tuple[str, str]] = []
    for key, value in _table(item, "sysctl", path).items():
        try:
            sysctls.append(check_sysctl(key, value))
        except ValueError as e:
            raise ConfigValueError(path + ("sysctl", key), str(e)) from None
    try:
        check_nsm_kind_settings(kind, cc, sysctls)
    except ValueError as e:
        raise ConfigValueError(path + ("kind",), str(e)) from None
    return NSMConfig(name, kind, cc, bandwidth, tuple(sysctls))


def check_nsm_kind_settings(kind: str, cc: str | None, sysctls: Sequence[tuple[str, str]]) -> None:
    """Congestion control and sysctls are the Linux stack's: an lwIP NSM has neither."""
    if kind == "lwip" and (cc or sysctls):
        raise ValueError(
            "an lwip NSM has no congestion_control or sysctl settings (lwIP's are "
            'built in); use kind = "kernel" for those'
        )


def _parse_tenant(item: object, path: KeyPath, nsms: tuple[NSMConfig, ...], defaults: Policy) -> TenantConfig:
    if not isinstance(item, dict):
        raise ConfigValueError(path, "must be a table ([[tenant]])")
    _check_keys(item, ("name", "nsm", "rw", "ro", *POLICY_PARSERS), path)
    if not isinstance(item.get("name"), str):
        raise ConfigValueError(path, 'needs a name, e.g. name = "web"')
    name = _parse_value(check_tenant_name, item["name"], path + ("name",))
    nsm = _string(item, "nsm", path, nsms[0].name)
    if not any(n.name == nsm for n in nsms):
        raise ConfigValueError(
            path + ("nsm",), f"no NSM named {nsm!r}; configured: {', '.join(n.name for n in nsms)}"
        )
    grants = {key: _parse_paths(item, key, path) for key in ("rw", "ro")}
    return TenantConfig(name, nsm, _parse_policy(item, defaults, path), **grants)


def _parse_paths(item: dict[str, Any], key: str, path: KeyPath) -> tuple[Path, ...]:
    value = item.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) and v.startswith("/") for v in value):
        raise ConfigValueError(path + (key,), f'must be a list of absolute paths, e.g. {key} = ["/srv/web"]')
    for v in value:
        if not os.path.exists(v):  # False also for a NUL in it or a name too long
            raise ConfigValueError(path + (key,), f"{v} does not exist on this host")
    return tuple(Path(v) for v in value)


def _array_of_tables(data: dict[str, Any], key: str, default: list[Any]) -> list[Any]:
    value = data.get(key, default)
    if not isinstance(value, list):
        raise ConfigValueError((key,), f"must be written as [[{key}]] tables")
    return value


def parse_config(data: dict[str, Any]) -> Config:
    """A Config from a parsed TOML document; ConfigValueError names the key path."""
    sections = ("daemon", "network", "defaults", "nsm", "tenant", "dns")
    for key in data:
        if key not in sections:
            raise ConfigValueError((key,), f"unknown section (known: {', '.join(sections)})")
    daemon = _parse_daemon(data)
    v4, v6, routes = _parse_network(data)

    defaults_table = _table(data, "defaults")
    _check_keys(defaults_table, tuple(POLICY_PARSERS), ("defaults",))
    defaults = _parse_policy(defaults_table, Policy(), ("defaults",))

    raw_nsms = _array_of_tables(data, "nsm", [{"name": "kernel"}])
    if not raw_nsms:
        raise ConfigValueError(("nsm",), "list at least one NSM ([[nsm]] with a name)")
    if len(raw_nsms) > MAX_NSMS:
        raise ConfigValueError(("nsm",), f"{len(raw_nsms)} NSMs; at most {MAX_NSMS}")
    nsms: list[NSMConfig] = []
    for i, item in enumerate(raw_nsms):
        nsm = _parse_nsm(item, ("nsm", i))
        if any(n.name == nsm.name for n in nsms):
            raise ConfigValueError(("nsm", i, "name"), f"NSM {nsm.name!r} is listed twice")
        nsms.append(nsm)

    tenants: list[TenantConfig] = []
    raw_tenants = _array_of_tables(data, "tenant", [])
    if len(raw_tenants) > MAX_TENANTS:
        raise ConfigValueError(("tenant",), f"{len(raw_tenants)} tenants; at most {MAX_TENANTS}")
    for i, item in enumerate(raw_tenants):
        tenant = _parse_tenant(item, ("tenant", i), tuple(nsms), defaults)
        if any(t.name == tenant.name for t in tenants):
            raise ConfigValueError(("tenant", i, "name"), f"tenant {tenant.name!r} is listed twice")
        tenants.append(tenant)

    dns = _table(data, "dns")
    _check_keys(dns, ("hosts", "zone", "forward"), ("dns",))
    zone = None
    if "zone" in dns:
        zone = _parse_value(check_zone, dns["zone"], ("dns", "zone"))
    forward: list[tuple[str, str]] = []
    for fzone, server in _table(dns, "forward", ("dns",)).items():
        fz = _parse_value(check_zone, fzone, ("dns", "forward", fzone))
        try:
            ipaddress.ip_address(server)
        except (ValueError, TypeError):
            raise ConfigValueError(
                ("dns", "forward", fzone),
                f'{server!r} is not an IP address; use the zone\'s DNS server, e.g. "198.20.0.1"',
            ) from None
        if fz == zone:
            raise ConfigValueError(("dns", "forward", fzone), "is this host's own zone")
        forward.append((fz, str(server)))
    hosts = _table(dns, "hosts", ("dns",))
    pairs: list[tuple[str, str]] = []
    for name, addr in hosts.items():
        try:
            ipaddress.ip_address(addr)
        except (ValueError, TypeError):
            raise ConfigValueError(
                ("dns", "hosts", name), f'{addr!r} is not an IP address; use e.g. "198.19.1.1"'
            ) from None
        pairs.append((name.lower().rstrip("."), str(addr)))

    return Config(
        ipv4_subnet=v4,
        ipv6_prefix=v6,
        nsms=tuple(nsms),
        dns_hosts=tuple(pairs),
        routes=routes,
        dns_zone=zone,
        dns_forward=tuple(forward),
        defaults=defaults,
        tenants=tuple(tenants),
        **daemon,
    )
