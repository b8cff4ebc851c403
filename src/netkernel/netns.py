"""Network namespaces, links and addresses.

We drive iproute2 (`ip`) rather than netlink directly: it is on every host that can run
NetKernel, its error messages are what operators already know, and named namespaces made by
`ip netns add` (bind mounts under /run/netns) are exactly what the engine is given.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import json
import logging
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

from . import pids
from .config import NETNS_DIR
from .errors import NetlinkError

log = logging.getLogger(__name__)

CLONE_NEWNS = 0x00020000
CLONE_NEWNET = 0x40000000

_libc = ctypes.CDLL(None, use_errno=True)

T = TypeVar("T")


def setns(fd: int, nstype: int) -> None:
    """setns(2); Python 3.11 has no os.setns."""
    if _libc.setns(fd, nstype) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"setns: {os.strerror(e)}")


def netns_path(name: str) -> Path:
    return NETNS_DIR / name


def ip(*args: str, netns: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    cmd = ["ip"] + (["-n", netns] if netns else []) + list(args)
    log.debug("run: %s", " ".join(cmd))
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if check and proc.returncode != 0:
        where = f" (in netns {netns})" if netns else ""
        raise NetlinkError(f"`{' '.join(cmd)}` failed{where}: {proc.stderr.strip()}")
    return proc


def ip_json(*args: str, netns: str | None = None) -> list[dict[str, Any]]:
    out = ip("-j", *args, netns=netns).stdout
    result = json.loads(out) if out.strip() else []
    return result if isinstance(result, list) else []


# -- namespaces ---------------------------------------------------------------------------


def netns_list() -> list[str]:
    try:
        return sorted(p.name for p in NETNS_DIR.iterdir())
    except FileNotFoundError:
        return []


def netns_exists(name: str) -> bool:
    return netns_path(name).exists()


def netns_add(name: str) -> None:
    ip("netns", "add", name)
    # `lo` is down in a new namespace; 127.0.0.1 (and the engine's 127.0.0.53 stub) need it.
    ip("link", "set", "lo", "up", netns=name)


def netns_del(name: str) -> None:
    if netns_exists(name):
        ip("netns", "del", name, check=False)
    # `ip netns exec` reads /etc/netns/NAME; we never create it but remove one if present.
    etc = Path("/etc/netns") / name
    if etc.is_dir():
        for f in etc.iterdir():
            f.unlink(missing_ok=True)
        etc.rmdir()


def run_in_netns(name: str, fn: Callable[[], T]) -> T:
    """Run ``fn`` in a thread that has entered netns ``name``.

    setns(CLONE_NEWNET) changes only the calling thread, and /proc/sys/net follows the
    thread's namespace, so a short-lived thread is enough to write per-namespace sysctls
    without forking the (multi-threaded) daemon.
    """
    result: list[T] = []
    error: list[BaseException] = []

    def target() -> None:
        try:
            fd = os.open(netns_path(name), os.O_RDONLY | os.O_CLOEXEC)
            try:
                setns(fd, CLONE_NEWNET)
            finally:
                os.close(fd)
            result.append(fn())
        except BaseException as e:  # re-raised in the caller's thread
            error.append(e)

    t = threading.Thread(target=target, name=f"netns-{name}")
    t.start()
    t.join()
    if error:
        raise error[0]
    return result[0]


def tcp_accepts(name: str | None, host: str, port: int, timeout: float = 0.5) -> bool:
    """True when host:port accepts a TCP connection, tried from netns ``name`` (None: here).

    The socket is made in a thread that entered the namespace, so it lives there."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET

    def attempt() -> bool:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            try:
                s.connect((host, port))
                return True
            except OSError:
                return False

    return run_in_netns(name, attempt) if name else attempt()


def sysctl(key: str, value: str, netns: str | None = None) -> None:
    path = Path("/proc/sys") / key.replace(".", "/")

    def write() -> None:
        path.write_text(value)

    try:
        run_in_netns(netns, write) if netns else write()
    except OSError as e:
        where = f" in netns {netns}" if netns else ""
        raise NetlinkError(f"cannot set sysctl {key}={value}{where}: {e.strerror}") from None


def sysctl_get(key: str, netns: str | None = None) -> str | None:
    """A sysctl's value as the namespace sees it, or None if it has no such key."""
    path = Path("/proc/sys") / key.replace(".", "/")

    def read() -> str | None:
        try:
            return path.read_text().strip()
        except OSError:
            return None

    return run_in_netns(netns, read) if netns else read()


# -- links and addresses --------------------------------------------------------------------


def link_exists(name: str, netns: str | None = None) -> bool:
    return ip("link", "show", "dev", name, netns=netns, check=False).returncode == 0


def link_names(netns: str | None = None) -> list[str]:
    return [str(link["ifname"]) for link in ip_json("link", "show", netns=netns)]


def link_del(name: str, netns: str | None = None) -> None:
    if link_exists(name, netns):
        ip("link", "del", "dev", name, netns=netns, check=False)


def bridge_add(name: str) -> None:
    ip("link", "add", name, "type", "bridge")
    # An empty bridge would run DAD on its link-local address; skip it so v6 works at once.
    sysctl(f"net.ipv6.conf.{name}.accept_dad", "0")
    ip("link", "set", name, "up")


def veth_into(root_name: str, netns: str, inner_name: str, bridge: str) -> None:
    """A veth pair: ``root_name`` enslaved to ``bridge``, ``inner_name`` inside ``netns``."""
    ip("link", "add", root_name, "type", "veth", "peer", "name", inner_name, "netns", netns)
    ip("link", "set", root_name, "master", bridge, "up")
    sysctl(f"net.ipv6.conf.{inner_name}.accept_dad", "0", netns=netns)
    ip("link", "set", inner_name, "up", netns=netns)


def addr_add(dev: str, cidr: str, netns: str | None = None) -> None:
    args = ["addr", "add", cidr, "dev", dev]
    if ":" in cidr:
        # nodad: the address is usable at once instead of "tentative" for a second or two.
        args.append("nodad")
    ip(*args, netns=netns)


def addr_del(dev: str, cidr: str, netns: str | None = None) -> None:
    ip("addr", "del", cidr, "dev", dev, netns=netns, check=False)


def addr_list(dev: str, netns: str | None = None) -> list[str]:
    """The addresses on ``dev`` as ``address/prefixlen``."""
    out: list[str] = []
    for link in ip_json("addr", "show", "dev", dev, netns=netns):
        for a in link.get("addr_info", []):
            out.append(f"{a['local']}/{a['prefixlen']}")
    return out


# -- processes in a namespace ------------------------------------------------------------------


def netns_inode(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def _in_netns(pid: int, want: tuple[int, int]) -> bool:
    return netns_inode(Path(f"/proc/{pid}/ns/net")) == want


def pids_in_netns(name: str) -> list[int]:
    """PIDs whose network namespace is netns ``name`` (by nsfs inode)."""
    want = netns_inode(netns_path(name))
    if want is None:
        return []
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        if netns_inode(Path(entry.path) / "ns" / "net") == want:
            found.append(int(entry.name))
    return sorted(found)


def kill_netns_processes(names: Iterable[str], grace: float = 2.0) -> None:
    """SIGTERM every process in these namespaces, then SIGKILL what is left after ``grace``."""
    names = list(names)

    def signal_all(sig: int) -> int:
        count = 0
        for name in names:
            want = netns_inode(netns_path(name))
            if want is None:
                continue
            for pid in pids_in_netns(name):
                # Only if the number is still a process in that namespace (pids.py).
                count += pids.signal_if(pid, sig, functools.partial(_in_netns, want=want))
        return count

    if not signal_all(signal.SIGTERM):
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if not any(pids_in_netns(n) for n in names):
            return
        time.sleep(0.05)
    signal_all(signal.SIGKILL)
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline and any(pids_in_netns(n) for n in names):
        time.sleep(0.05)


# -- feature check ---------------------------------------------------------------------------


def check_kernel_features() -> list[str]:
    """Names of kernel features NetKernel needs and this host lacks (empty if all present).

    Probed for real in a scratch namespace: a module may be built in (no /sys/module entry)
    or loadable on demand, so only trying tells.
    """
    missing: list[str] = []
    if not Path("/proc/self/ns/net").exists():
        return ["network namespaces (CONFIG_NET_NS)"]
    try:
        os.close(os.memfd_create("netkernel-check", os.MFD_CLOEXEC))
    except OSError as e:
        if e.errno in (errno.ENOSYS, errno.EINVAL):
            missing.append("memfd (CONFIG_MEMFD_CREATE)")
        else:
            raise
    scratch = f"nk-check-{os.getpid()}"
    if ip("netns", "add", scratch, check=False).returncode != 0:
        return missing + ["network namespaces (CONFIG_NET_NS; `ip netns add` failed)"]
    try:
        if ip("link", "add", "nkchk0", "type", "bridge", netns=scratch, check=False).returncode:
            missing.append("bridge (CONFIG_BRIDGE)")
        if ip(
            "link", "add", "nkchk1", "type", "veth", "peer", "name", "nkchk2", netns=scratch, check=False
        ).returncode:
            missing.append("veth (CONFIG_VETH)")
    finally:
        ip("netns", "del", scratch, check=False)
    return missing


def set_autogroup_nice(pid: int, nice: int) -> None:
    """Set the CPU weight of pid's session. With sched_autogroup (on in Debian's kernels)
    the scheduler shares CPU between sessions first and only then between the processes in
    one, so a process's own nice value does not lift or lower it against another session's
    processes: the session's, in /proc/PID/autogroup, must be set. A kernel without
    autogroups has no such file and nothing to set; other errors (OSError) are the caller's."""
    try:
        Path(f"/proc/{pid}/autogroup").write_text(f"{nice}\n")
    except FileNotFoundError:
        pass


# -- mounts -------------------------------------------------------------------------------

MS_NOSUID = 2
MS_NODEV = 4
MNT_DETACH = 2


def mount_tmpfs(path: Path, size: int, uid: int, gid: int, mode: int = 0o755) -> None:
    """A tmpfs of ``size`` bytes (0: the kernel's default, half the RAM) at ``path``."""
    opts = f"mode={mode:o},uid={uid},gid={gid}" + (f",size={size}" if size else "")
    if _libc.mount(b"tmpfs", str(path).encode(), b"tmpfs", MS_NOSUID | MS_NODEV, opts.encode()) != 0:
        e = ctypes.get_errno()
        raise NetlinkError(f"cannot mount a tmpfs on {path}: {os.strerror(e)}")


def mounts_under(path: Path) -> list[Path]:
    """Mount points at or below ``path``, deepest first."""
    prefix = str(path).rstrip("/")
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].replace("\\040", " ")
        if point == prefix or point.startswith(prefix + "/"):
            found.append(Path(point))
    return sorted(found, key=lambda p: len(p.parts), reverse=True)


def umount_all(path: Path) -> list[Path]:
    """Detach every mount at or below ``path``; returns them."""
    gone = mounts_under(path)
    for point in gone:
        _libc.umount2(str(point).encode(), MNT_DETACH)
    return gone
