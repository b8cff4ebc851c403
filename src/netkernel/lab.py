"""Several NetKernel hosts on one machine: a lab for tests and for people trying NetKernel.

Each host is a network namespace ``nklab-<host>`` (its "host network") in which a daemon runs
in a mount namespace of its own: its /run/netkernel (bound from the lab's directory, so the
lab can read its pid file), its /run/netns (a tmpfs: its NSM and tenant namespaces are
invisible to the other hosts) and its /var/log, and its own cgroup (``netkernel-lab.<host>``
below the caller's), under which it makes its tenants' cgroups. Everything else — the
installed netkernel, /etc, /var/lib/netkernel — is the machine's: tenant uid ranges are
recorded there by full name (``web.h1.lab``), so tenants of different hosts never share one.
Each daemon builds its own bridge, NSMs and tenants exactly as on a real host.

The fabric joins the hosts: a namespace ``nklab-fabric`` holding a bridge, one veth per host
(``fab0`` in the host, ``<host>`` on the bridge), 100.64.0.<i>/24 and fd6e:6bff::<i>/64 on the
hosts' ends. Hosts route each other's NetKernel subnets over it; each daemon's config lets its
NSMs reach the other subnets (``[network] routes``) and forwards the other hosts' DNS zones
(``<tenant>.<host>.lab``) to them. A link may be shaped per host, both directions: ``rate``
(tbf), ``delay`` and ``loss`` (netem), ``queue`` (the tbf queue, in time, default 20ms).

A lab is described by /run/netkernel-lab/lab.json; ``down`` removes all of it, also after a
half-built ``up`` (which removes what it built before reporting the error).
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import cgroups, fabric, netns, pids
from .config import check_congestion_control, parse_rate
from .errors import NetKernelError

LAB_DIR = Path("/run/netkernel-lab")
STATE = LAB_DIR / "lab.json"
FABRIC_NETNS = "nklab-fabric"
HOST_NETNS_PREFIX = "nklab-"
FABRIC_BRIDGE = "fab"
FABRIC_V4 = ipaddress.IPv4Network("100.64.0.0/24")
FABRIC_V6 = ipaddress.IPv6Network("fd6e:6bff::/64")
CGROUP_PREFIX = "netkernel-lab."
MAX_HOSTS = 8
_LINK_KEYS = ("rate", "delay", "loss", "queue")
_TIME_RE = re.compile(r"^\d+(\.\d+)?(us|ms|s)$")
_LOSS_RE = re.compile(r"^\d+(\.\d+)?%$")


class LabError(NetKernelError):
    """The lab could not be built, used or removed."""


@dataclass
class Host:
    name: str
    index: int
    ipv4_subnet: str
    ipv6_prefix: str
    link: dict[str, str] = field(default_factory=dict)
    congestion_control: str | None = None  # its NSM's; None: the kernel's default
    cgroups: list[str] = field(default_factory=list)  # its daemon's, one per controller

    @property
    def netns(self) -> str:
        return HOST_NETNS_PREFIX + self.name

    @property
    def dir(self) -> Path:
        return LAB_DIR / self.name

    @property
    def fabric_v4(self) -> ipaddress.IPv4Address:
        return FABRIC_V4.network_address + self.index

    @property
    def fabric_v6(self) -> ipaddress.IPv6Address:
        return FABRIC_V6.network_address + self.index

    @property
    def zone(self) -> str:
        return f"{self.name}.lab"

    @property
    def dns_server(self) -> str:
        return str(ipaddress.IPv4Network(self.ipv4_subnet).network_address + 1)


# -- the description, checked before anything is built -------------------------------------------


def default_subnets(index: int) -> tuple[str, str]:
    """Host i: 198.18.(16 i).0/20 and fd6e:6b0i::/64 — disjoint, and beside the addresses a
    default (single-host) NetKernel uses only in another namespace."""
    return f"198.18.{16 * index}.0/20", f"fd6e:6b{index:02x}::/64"


def parse_link(text: str) -> tuple[str, dict[str, str]]:
    """``h3:rate=300mbit,delay=2ms,loss=0.1%,queue=20ms`` → ("h3", {...})."""
    host, sep, spec = text.partition(":")
    if not sep or not spec:
        raise LabError(f"link {text!r}: use HOST:KEY=VALUE,..., e.g. h3:rate=300mbit,delay=2ms")
    out: dict[str, str] = {}
    for item in spec.split(","):
        key, eq, value = item.partition("=")
        if not eq or key not in _LINK_KEYS:
            raise LabError(
                f"link {text!r}: {item!r} is not KEY=VALUE with KEY one of {', '.join(_LINK_KEYS)}"
            )
        if key == "rate":
            try:
                parse_rate(value)
            except ValueError as e:
                raise LabError(f"link {text!r}: rate: {e}") from None
        elif key in ("delay", "queue") and not _TIME_RE.match(value):
            raise LabError(f"link {text!r}: {key} {value!r} is not a time such as 2ms or 500us")
        elif key == "loss" and not _LOSS_RE.match(value):
            raise LabError(f"link {text!r}: loss {value!r} is not a percentage such as 0.1%")
        out[key] = value
    return host, out


def plan(
    hosts: int, links: list[str], subnets: list[str], congestion_control: str | None = None
) -> list[Host]:
    """The hosts to build; LabError for anything wrong, before anything exists."""
    if not 2 <= hosts <= MAX_HOSTS:
        raise LabError(f"--hosts {hosts}: a lab has 2 to {MAX_HOSTS} hosts")
    if congestion_control is not None:
        try:
            check_congestion_control(congestion_control)
        except ValueError as e:
            raise LabError(f"--congestion-control: {e}") from None
    out = [
        Host(f"h{i}", i, *default_subnets(i), congestion_control=congestion_control)
        for i in range(1, hosts + 1)
    ]
    by_name = {h.name: h for h in out}

    def host(name: str, what: str) -> Host:
        if name not in by_name:
            raise LabError(f"{what}: no host {name!r} (the lab's hosts: {', '.join(by_name)})")
        return by_name[name]

    for text in subnets:
        name, sep, value = text.partition("=")
        h = host(name, f"--subnet {text}")
        try:
            net = ipaddress.IPv4Network(value) if sep else None
        except ValueError as e:
            raise LabError(f"--subnet {text}: {e}") from None
        if net is None:
            raise LabError(f"--subnet {text!r}: use HOST=PREFIX, e.g. h2=198.18.32.0/20")
        if net.prefixlen > 22:
            raise LabError(f"--subnet {text}: {net} is too small (need /22 or larger)")
        if net.overlaps(FABRIC_V4):
            raise LabError(f"--subnet {text}: {net} overlaps the fabric's {FABRIC_V4}")
        h.ipv4_subnet = str(net)
    for a in out:
        for b in out:
            if a.index < b.index and ipaddress.IPv4Network(a.ipv4_subnet).overlaps(
                ipaddress.IPv4Network(b.ipv4_subnet)
            ):
                raise LabError(
                    f"host {b.name}'s subnet {b.ipv4_subnet} overlaps host {a.name}'s {a.ipv4_subnet}: "
                    "each host needs its own (--subnet HOST=PREFIX)"
                )
    for text in links:
        name, spec = parse_link(text)
        host(name, f"--link {text}").link = spec
    return out


def host_config(h: Host, hosts: list[Host]) -> str:
    """The TOML of one host's daemon: its subnets, routes to the others', DNS zones."""
    others = [o for o in hosts if o.name != h.name]
    routes = [o.ipv4_subnet for o in others] + [o.ipv6_prefix for o in others]
    lines = [
        "# Written by `netkernel lab up`: one host of the lab.",
        "[network]",
        f'ipv4_subnet = "{h.ipv4_subnet}"',
        f'ipv6_prefix = "{h.ipv6_prefix}"',
        "routes = [" + ", ".join(f'"{r}"' for r in routes) + "]",
        "",
        "[dns]",
        f'zone = "{h.zone}"',
        "",
        "[dns.forward]",
        *(f'"{o.zone}" = "{o.dns_server}"' for o in others),
        "",
    ]
    if h.congestion_control:
        lines += ["[[nsm]]", 'name = "kernel"', f'congestion_control = "{h.congestion_control}"', ""]
    return "\n".join(lines)


# -- building and removing -------------------------------------------------------------------------


def _run(*cmd: str) -> None:
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        why = (r.stderr or r.stdout).strip()
        if "netem" in cmd and "qdisc kind is unknown" in why:
            why += " (this kernel has no netem qdisc: delay and loss cannot be emulated here; rate can)"
        raise LabError(f"{' '.join(cmd[4:])}: {why}")


def _shape(netns_name: str, dev: str, link: dict[str, str]) -> None:
    """netem (delay, loss) at the root, tbf (rate, queue) below it: the order tc-netem(8)
    documents for a delayed, rate-limited link."""
    tc = ["ip", "netns", "exec", netns_name, "tc", "qdisc", "add", "dev", dev]
    tbf_parent = ["root", "handle", "1:"]
    if "delay" in link or "loss" in link:
        netem = ["root", "handle", "1:", "netem", "limit", "100000"]
        if "delay" in link:
            netem += ["delay", link["delay"]]
        if "loss" in link:
            netem += ["loss", link["loss"]]
        _run(*tc, *netem)
        tbf_parent = ["parent", "1:1", "handle", "10:"]
    if "rate" in link:
        bits = parse_rate(link["rate"])
        # A burst of at least one 64 KiB GSO segment, and what the rate moves in 1 ms.
        burst = max(65536 + 1514, bits // 8 // 1000)
        _run(
            *tc,
            *tbf_parent,
            "tbf",
            "rate",
            f"{bits}bit",
            "burst",
            str(burst),
            "latency",
            link.get("queue", "20ms"),
        )


def _host_cgroup_dirs(name: str) -> list[str]:
    """Below the caller's own cgroup, per controller (as a service manager would give)."""
    return sorted({str(p.base / f"{CGROUP_PREFIX}{name}") for p in cgroups.discover().values()})


def _enter_cgroups(dirs: list[str]) -> None:
    """In the forked child before exec: the host's daemon and all it starts sit there."""
    for d in dirs:
        try:
            Path(d, "cgroup.procs").write_text(f"{os.getpid()}\n")
        except OSError:
            pass  # a controller we could not use: the host's tenants run without that limit


def _start_daemon(h: Host) -> None:
    run_dir, log_dir = h.dir / "run", h.dir / "log"
    for d in (run_dir, log_dir, Path("/run/netkernel"), Path("/run/netns")):
        d.mkdir(parents=True, exist_ok=True)
    conf = h.dir / "netkernel.toml"
    dirs = h.cgroups
    for cg in dirs:
        Path(cg).mkdir(exist_ok=True)
    q = shlex.quote
    script = (
        f"mount --bind {q(str(run_dir))} /run/netkernel && "
        "mount -t tmpfs -o mode=0755,size=1m nklab-netns /run/netns && "
        f"mount --bind {q(str(log_dir))} /var/log && "
        f'exec "$0" -m netkernel up --config {q(str(conf))}'
    )
    r = subprocess.run(
        [
            "nsenter",
            f"--net=/run/netns/{h.netns}",
            "unshare",
            "--mount",
            "--propagation",
            "slave",
            "sh",
            "-c",
            script,
            sys.executable,
        ],
        capture_output=True,
        text=True,
        cwd="/",  # `python -m` imports from the working directory first
        preexec_fn=lambda: _enter_cgroups(dirs),
    )
    if r.returncode != 0:
        log = (
            (log_dir / "netkernel.log").read_text(errors="replace")[-2000:]
            if (log_dir / "netkernel.log").exists()
            else ""
        )
        raise LabError(f"host {h.name}: the daemon did not start: {(r.stderr or r.stdout).strip()}\n{log}")
    # Its tenants' cgroups are made below its own: hosts sharing one would share them.
    pid = daemon_pid(h)
    own = Path(f"/proc/{pid}/cgroup").read_text() if pid else ""
    if dirs and f"/{CGROUP_PREFIX}{h.name}" not in own:
        raise LabError(
            f"host {h.name}: its daemon is not in its cgroup {CGROUP_PREFIX}{h.name} ({own.strip()!r})"
        )


def up(hosts: list[Host]) -> None:
    if STATE.exists() or netns.netns_exists(FABRIC_NETNS):
        raise LabError("a lab is already up: `netkernel lab down` first")
    LAB_DIR.mkdir(mode=0o755, parents=True, exist_ok=True)
    for h in hosts:
        h.cgroups = _host_cgroup_dirs(h.name)
    STATE.write_text(json.dumps({"hosts": [asdict(h) for h in hosts]}, indent=1) + "\n")
    try:
        _build(hosts)
    except BaseException:
        down()
        raise


def _build(hosts: list[Host]) -> None:
    # A host's daemon runs in a network namespace, where the host-wide list of allowed
    # congestion controls is read-only: add its NSMs' algorithm from here.
    for cc in {h.congestion_control for h in hosts if h.congestion_control}:
        fabric.allow_congestion_control(cc)
    netns.netns_add(FABRIC_NETNS)
    netns.ip("link", "add", FABRIC_BRIDGE, "type", "bridge", netns=FABRIC_NETNS)
    for dev in ("lo", FABRIC_BRIDGE):
        netns.ip("link", "set", dev, "up", netns=FABRIC_NETNS)
    for h in hosts:
        netns.netns_add(h.netns)
        netns.sysctl("net.ipv6.conf.default.accept_dad", "0", netns=h.netns)
        netns.ip(
            "link",
            "add",
            h.name,
            "type",
            "veth",
            "peer",
            "name",
            "fab0",
            "netns",
            h.netns,
            netns=FABRIC_NETNS,
        )
        netns.ip("link", "set", h.name, "master", FABRIC_BRIDGE, "up", netns=FABRIC_NETNS)
        for dev in ("lo", "fab0"):
            netns.ip("link", "set", dev, "up", netns=h.netns)
        netns.addr_add("fab0", f"{h.fabric_v4}/{FABRIC_V4.prefixlen}", netns=h.netns)
        netns.addr_add("fab0", f"{h.fabric_v6}/{FABRIC_V6.prefixlen}", netns=h.netns)
        netns.sysctl("net.ipv4.ip_forward", "1", netns=h.netns)
        netns.sysctl("net.ipv6.conf.all.forwarding", "1", netns=h.netns)
        for o in hosts:
            if o is not h:
                netns.ip("route", "add", o.ipv4_subnet, "via", str(o.fabric_v4), netns=h.netns)
                netns.ip("-6", "route", "add", o.ipv6_prefix, "via", str(o.fabric_v6), netns=h.netns)
        if h.link:
            _shape(FABRIC_NETNS, h.name, h.link)  # towards the host
            _shape(h.netns, "fab0", h.link)  # from it
    for h in hosts:
        h.dir.mkdir(mode=0o755, exist_ok=True)
        (h.dir / "netkernel.toml").write_text(host_config(h, hosts))
    for h in hosts:
        _start_daemon(h)


def load() -> list[Host]:
    try:
        data = json.loads(STATE.read_text())
        return [Host(**h) for h in data["hosts"]]
    except FileNotFoundError:
        raise LabError("no lab is up (start one with `netkernel lab up`)") from None
    except (ValueError, KeyError, TypeError) as e:
        raise LabError(f"{STATE} is damaged ({e}); `netkernel lab down` removes what is left") from None


def daemon_pid(h: Host) -> int | None:
    """The host's daemon, if it runs: the pid in its pid file, and only while that process is
    in the host's network namespace (a pid reused by another program, the machine's own daemon
    say, must never be entered or stopped as a lab host)."""
    try:
        pid = int((h.dir / "run" / "daemon.pid").read_text())
    except (OSError, ValueError):
        return None
    want = netns.netns_inode(netns.netns_path(h.netns))
    if want is None or netns.netns_inode(Path(f"/proc/{pid}/ns/net")) != want:
        return None
    return pid


def exec_argv(h: Host, cmd: list[str]) -> list[str]:
    """The command line that runs ``cmd`` on host ``h``, as if logged in there."""
    pid = daemon_pid(h)
    if pid is None:
        raise LabError(f"host {h.name}: its daemon is not running (see {h.dir / 'log' / 'netkernel.log'})")
    return ["nsenter", "-t", str(pid), "--mount", "--net", "--", *cmd]


def find(hosts: list[Host], name: str) -> Host:
    for h in hosts:
        if h.name == name:
            return h
    raise LabError(f"no host {name!r} in the lab (hosts: {', '.join(h.name for h in hosts)})")


def down() -> list[str]:
    """Remove the lab, whatever state it is in; the problems met, for the caller to report."""
    problems: list[str] = []
    try:
        hosts = load()
    except LabError:
        hosts = []
    known = {h.name: h for h in hosts}
    for n in netns.netns_list():  # hosts of a lab whose state file was lost
        name = n[len(HOST_NETNS_PREFIX) :]
        if n.startswith(HOST_NETNS_PREFIX) and n != FABRIC_NETNS and name not in known:
            known[name] = Host(name, 0, "", "", cgroups=_host_cgroup_dirs(name))
    for name, h in sorted(known.items()):
        pid = daemon_pid(h)
        if pid is not None:
            r = subprocess.run(
                exec_argv(h, [sys.executable, "-m", "netkernel", "down"]), capture_output=True, text=True
            )
            if r.returncode != 0:
                problems.append(f"host {name}: `netkernel down` failed: {r.stderr.strip()}")
        # Whatever is left of the host (its daemon and tenants, if down failed) goes with it.
        for d in h.cgroups:
            _kill_tree(Path(d))
        if netns.netns_exists(h.netns):
            netns.kill_netns_processes([h.netns])
            netns.netns_del(h.netns)
        for d in h.cgroups:
            _rmdir_tree(Path(d), problems)
    if netns.netns_exists(FABRIC_NETNS):
        netns.netns_del(FABRIC_NETNS)
    shutil.rmtree(LAB_DIR, ignore_errors=True)
    return problems


def _kill_tree(d: Path) -> None:
    for procs in d.rglob("cgroup.procs") if d.is_dir() else ():
        try:
            listed = [int(x) for x in procs.read_text().split()]
        except (OSError, ValueError):
            continue

        def listed_there(pid: int, procs: Path = procs) -> bool:
            return str(pid) in procs.read_text().split()

        for pid in listed:
            pids.signal_if(pid, signal.SIGKILL, listed_there)


def _rmdir_tree(d: Path, problems: list[str]) -> None:
    if not d.exists():
        return
    for child in sorted(d.iterdir()):
        if child.is_dir():
            _rmdir_tree(child, problems)
    for _ in range(20):  # a cgroup empties a moment after its last process is reaped
        try:
            d.rmdir()
            return
        except OSError:
            time.sleep(0.1)
    problems.append(f"cgroup {d} could not be removed (processes still in it?)")


def status() -> list[dict[str, object]]:
    out: list[dict[str, object]] = []
    for h in load():
        out.append(
            {
                "host": h.name,
                "daemon_pid": daemon_pid(h),
                "fabric": [str(h.fabric_v4), str(h.fabric_v6)],
                "ipv4_subnet": h.ipv4_subnet,
                "ipv6_prefix": h.ipv6_prefix,
                "zone": h.zone,
                "link": h.link,
            }
        )
    return out
