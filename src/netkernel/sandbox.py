"""Tenant sandboxes: what a tenant's processes run in, besides their network namespace.

A tenant is a hostile program. Its processes get nothing of the host's privileges:

- a **user namespace** whose root is an unprivileged host uid: a tenant has host uids
  ``TENANT_UID_BASE + N * 65536`` and the 65535 after it, mapped as its uids 0..65535, so
  programs that switch users (nginx workers as ``nobody``, postgres via ``setpriv``) keep
  working, and two tenants never share a host uid (they cannot signal or ptrace each other,
  nor write each other's files). ``N`` belongs to the tenant's name for good (``UID_RANGES``):
  files a tenant leaves in a directory granted to it stay its own after it is deleted, the
  daemon restarts or tenants are made in another order, never another tenant's;
- its own **pid, IPC, UTS and cgroup namespaces**, shared by all its processes (``netkernel
  run`` twice in one tenant sees one process tree: ``nginx -s reload`` finds its master), so
  it cannot see, let alone signal, the engine, the daemon or other tenants;
- the **host filesystem read-only**, with ``/proc`` of its own (``/proc/sys`` read-only), a
  ``/dev`` of the usual devices, and ``/run``, ``/var/tmp`` and ``/dev/shm`` private and
  writable (on a tmpfs of its own that lives as long as the tenant: not the host's ``/run``,
  so none of NetKernel's sockets but the engine's control socket is there). The operator
  grants more with ``--rw PATH`` / ``--ro PATH`` (or ``rw``/``ro`` in the config);
- **no_new_privs** and a **seccomp filter** (``csrc/sandbox/seccomp.c``) in the spirit of the
  container runtimes' default profiles;
- a **cgroup** with the policy's memory, process and CPU-weight limits (``cgroups.py``).

The sandbox is built by bubblewrap, the setuid-free sandbox Flatpak uses, rather than by
hand: it is small, audited and does the mount-namespace work (read-only binds made recursive,
a fresh /proc and /dev, no_new_privs, seccomp loading) that a hand-written version would have
to get right in every detail. NetKernel adds what bubblewrap leaves to its caller: the uid
*range* (bubblewrap maps one uid; here the root launcher writes the full map while bubblewrap
waits, ``--userns-block-fd``), the namespaces shared by all processes of a tenant (a "holder"
process keeps them; later processes join with ``--userns``/``--pidns`` and ``setns``), the
network namespace and the cgroups (entered before bubblewrap runs).

The launcher runs as root; bubblewrap itself runs as the tenant's host uid, so every path it
binds it opens with the tenant's rights: what NetKernel hands in lives where a tenant may
reach it (the private directories and, under /run/netkernel, the engine's socket and a copy
of GuestLib). Grants are opened by the launcher, with no symbolic link on the way, checked
(with the reason when the tenant could not use one) and bound from that descriptor.
"""

from __future__ import annotations

import ctypes
import fcntl
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import cgroups, netns, relay
from .config import ENGINE_SOCKET, RELAY_PORT, RUN_DIR, STATE_DIR, TENANTS_DIR, libdir
from .errors import InstallError, NetKernelError

TENANT_UID_BASE = 1_000_000_000
TENANT_UID_COUNT = 65536
# What root inside a tenant may do (to its own things only: it has no capability over
# anything the host owns). Docker's default set, less what a user namespace makes useless.
CAPABILITIES = (
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_SETFCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_AUDIT_WRITE",
)
# GuestLib as tenants see it: a copy the daemon makes at start (install_guestlib), bound at
# the same path inside the sandbox, under its private /run.
GUESTLIB_HOST_DIR = RUN_DIR / "lib"
GUESTLIB_DIR = str(GUESTLIB_HOST_DIR)
# The relay (relay.py) is the holder's program: it lives as long as the tenant's namespaces.
RELAY_NAME = "netkernel-relay"
VM_BRIDGE_NAME = "netkernel-vm-bridge"  # a VM tenant's network, host half (csrc/vm/bridge.c)
RELAY_LOG = "/run/netkernel/relay.log"  # in the tenant's private /run
CLONE_NEWNET = 0x40000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUTS = 0x04000000

_libc = ctypes.CDLL(None, use_errno=True)


class SandboxError(NetKernelError):
    """A tenant's sandbox could not be made or entered."""


UID_RANGES = STATE_DIR / "uid-ranges.json"
# The last range ends below 2**32 - 1 (the kernel's "no uid").
UID_SLOTS = (2**32 - 1 - TENANT_UID_BASE) // TENANT_UID_COUNT


def uid_base(slot: int) -> int:
    return TENANT_UID_BASE + slot * TENANT_UID_COUNT


def uid_slot(name: str, path: Path | None = None) -> int:
    """The uid range of the tenant called ``name``: the one it had before (whether it was
    deleted since or the daemon restarted), else the first never given to any name, recorded
    at once. A range is never handed to another name: files its tenant left in a directory
    granted to it (or chowned to it) would become the new tenant's."""
    path = UID_RANGES if path is None else path
    path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            doc = json.loads(path.read_text())
            ranges = doc["ranges"]
            if not isinstance(ranges, dict):
                raise ValueError("ranges is not a table")
        except FileNotFoundError:
            ranges = {}
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise SandboxError(
                f"{path} is unreadable ({e}): it records which host uids each "
                "tenant was given; restore it from a backup (or, if no "
                "tenant's files are left on the host, remove it)"
            ) from None
        slot = ranges.get(name)
        if isinstance(slot, int) and 1 <= slot < UID_SLOTS:
            return slot
        taken = {v for v in ranges.values() if isinstance(v, int)}
        slot = next((n for n in range(1, UID_SLOTS) if n not in taken), None)
        if slot is None:
            raise SandboxError(
                f"every host uid range has been given to a tenant name ({path}): "
                "remove the names of tenants whose files are gone from it"
            )
        ranges[name] = slot
        tmp = path.with_suffix(".new")
        tmp.write_text(json.dumps({"version": 1, "ranges": ranges}, indent=1, sort_keys=True) + "\n")
        os.replace(tmp, path)
        return slot


def bwrap() -> str:
    path = shutil.which("bwrap")
    if path is None:
        raise InstallError(
            "bubblewrap is not installed: tenants run in its sandbox (apt-get install bubblewrap)"
        )
    return path


def seccomp_filter() -> Path:
    path = libdir() / "seccomp.bpf"
    if not path.is_file():
        raise InstallError(
            f"the tenants' seccomp filter is not at {path} (reinstall with "
            "`pip install .`, or set NETKERNEL_LIBDIR to a build directory)"
        )
    return path


def private_dirs(fs: Path) -> dict[str, Path]:
    """The tenant's private, writable directories on its tmpfs, by where they appear."""
    return {"/run": fs / "run", "/var/tmp": fs / "var-tmp", "/dev/shm": fs / "shm"}


def prepare_private_fs(fs: Path, base: int) -> None:
    """The directories of a fresh tenant tmpfs, owned by the tenant's root."""
    modes = {"/run": 0o755, "/var/tmp": 0o1777, "/dev/shm": 0o1777}
    for where, d in private_dirs(fs).items():
        d.mkdir(exist_ok=True)
        os.chown(d, base, base)
        os.chmod(d, modes[where])
    # Where GuestLib and the engine's socket appear: every user of the tenant must reach them
    # (bubblewrap would make the directory for their mount points 0700).
    for sub in ("netkernel", "netkernel/lib"):
        d = fs / "run" / sub
        d.mkdir(mode=0o755, exist_ok=True)
        os.chown(d, base, base)
        os.chmod(d, 0o755)


# -- entering namespaces and cgroups (in the forked child, before exec) -------------------


def _setns_path(path: str, flag: int) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc.setns(fd, flag) != 0:
            e = ctypes.get_errno()
            raise OSError(e, f"setns {path}: {os.strerror(e)}")
    finally:
        os.close(fd)


def _become_tenant(rec: dict[str, Any], holder: int | None) -> None:
    """Network namespace, cgroups, and (joining) the holder's IPC and UTS namespaces, while
    still root; then the tenant's host uid, which bubblewrap runs as."""
    _setns_path(rec["netns_path"], CLONE_NEWNET)
    cgroups.join(rec.get("cgroups") or {})
    if holder is not None:
        _setns_path(f"/proc/{holder}/ns/ipc", CLONE_NEWIPC)
        _setns_path(f"/proc/{holder}/ns/uts", CLONE_NEWUTS)
    base = int(rec["uid_base"])
    os.setgroups([])
    os.setresgid(base, base, base)
    os.setresuid(base, base, base)


# -- the holder: the namespaces all processes of a tenant share ---------------------------


def start_time(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _holder_alive(rec: dict[str, Any], pid: int, start: str) -> bool:
    if start_time(pid) != start:
        return False
    try:
        return os.stat(f"/proc/{pid}/ns/net").st_ino == os.stat(rec["netns_path"]).st_ino
    except OSError:
        return False


def _write_maps(pid: int, base: int) -> None:
    for f in ("uid_map", "gid_map"):
        with open(f"/proc/{pid}/{f}", "w") as m:
            m.write(f"0 {base} {TENANT_UID_COUNT}\n")


def _read_info(fd: int, timeout: float = 10.0) -> dict[str, Any]:
    """bubblewrap's --info-fd document (it writes it once the sandbox's child exists)."""
    buf = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        buf += chunk
        try:
            doc = json.loads(buf)
            if isinstance(doc, dict):
                return doc
        except json.JSONDecodeError:
            continue
    raise SandboxError(f"bubblewrap did not start the sandbox (it said: {buf.decode(errors='replace')!r})")


def holder(rec: dict[str, Any]) -> int:
    """The pid (in the host's namespace) of the process whose namespaces the tenant's
    processes share, started if there is none (the first `netkernel run` of a tenant, or
    after all its processes were killed)."""
    d = TENANTS_DIR / rec["name"]
    lock = os.open(d / "holder.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        pidfile = d / "holder.pid"
        try:
            pid_s, start, *_ = pidfile.read_text().split()
            if _holder_alive(rec, int(pid_s), start):
                return int(pid_s)
        except (OSError, ValueError):
            pass
        pid = _start_holder(rec)
        start = start_time(pid)
        if start is None:
            raise SandboxError(f"tenant {rec['name']}: its namespaces' holder died at once")
        # The holder's processes (bubblewrap outside, its init, the relay that keeps it up),
        # which are NetKernel's, not the tenant's programs: `ps` leaves them out.
        own = [_parent(pid), pid, *_children(pid)]
        pidfile.write_text(f"{pid} {start} {' '.join(map(str, own))}\n")
        return pid
    finally:
        os.close(lock)


def _holder_record(name: str) -> tuple[int, set[int]] | None:
    """Tenant ``name``'s holder: its init's pid and all its processes' (None: it has none)."""
    try:
        pid, start, *own = (TENANTS_DIR / name / "holder.pid").read_text().split()
        if start_time(int(pid)) == start:
            return int(pid), {int(p) for p in own}
    except (OSError, ValueError):
        pass
    return None


def programs(name: str, pids: list[int]) -> list[int]:
    """Of ``pids`` (the processes in tenant ``name``'s network namespace), its programs: those
    in its pid namespace, less its holder (bubblewrap's processes outside, which watch each
    program, are NetKernel's too)."""
    rec = _holder_record(name)
    own = rec[1] if rec else set()
    try:
        pidns = os.stat(f"/proc/{rec[0]}/ns/pid").st_ino if rec else None
    except OSError:
        pidns = None
    out = []
    for pid in pids:
        if pid in own:
            continue
        try:  # the relay's worker, a child of the holder's program (not of its init)
            parent = _parent(pid)
            if rec and parent in own and parent != rec[0]:
                continue
        except (OSError, ValueError, IndexError):
            continue
        try:
            if pidns is not None and os.stat(f"/proc/{pid}/ns/pid").st_ino != pidns:
                continue
        except OSError:
            continue
        out.append(pid)
    return out


def _running(pid: int) -> bool:
    """Not gone and not a zombie (dead, its parent yet to reap it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in "ZX"
    except (OSError, IndexError):
        return False


def _parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _start_holder(rec: dict[str, Any]) -> int:
    """The holder's processes are in the tenant's pid namespace (its init is pid 1 there) and
    run as the tenant's root, so its programs may look into them (/proc/1/root) and ptrace
    them: they see the same files as the tenant's programs and run under the same seccomp
    filter, so that gains nothing."""
    base = int(rec["uid_base"])
    try:
        filt = os.open(seccomp_filter(), os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise SandboxError(f"tenant {rec['name']}: cannot open {e.filename}: {e.strerror}") from None
    try:
        udp = netns.run_in_netns(rec["netns"], relay.transparent_udp_sockets)
    except OSError as e:
        os.close(filt)
        raise SandboxError(f"tenant {rec['name']}: cannot make the relay's UDP sockets: {e}") from None
    block_r, block_w = os.pipe2(os.O_CLOEXEC)
    info_r, info_w = os.pipe2(os.O_CLOEXEC)
    cmd = [
        bwrap(),
        "--unshare-user",
        "--userns-block-fd",
        str(block_r),
        "--info-fd",
        str(info_w),
        "--uid",
        "0",
        "--gid",
        "0",
        "--unshare-pid",
        "--unshare-ipc",
        "--unshare-uts",
        "--hostname",
        rec["name"],
        *_view(rec),
        "--cap-drop",
        "ALL",
        "--seccomp",
        str(filt),
        *[a for k, v in tenant_env({}, rec["name"]).items() for a in ("--setenv", k, v)],
        "--",
        f"{GUESTLIB_DIR}/{RELAY_NAME}",
        "--port",
        str(RELAY_PORT),
        "--log",
        RELAY_LOG,
        "--udp4-fd",
        str(udp[0].fileno()),
        "--udp6-fd",
        str(udp[1].fileno()),
    ]
    try:
        proc = subprocess.Popen(
            cmd,
            pass_fds=(block_r, info_w, filt, udp[0].fileno(), udp[1].fileno()),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
            preexec_fn=lambda: _become_tenant(rec, None),
        )
    except (OSError, subprocess.SubprocessError) as e:
        raise SandboxError(f"tenant {rec['name']}: cannot start its sandbox: {e}") from None
    finally:
        os.close(block_r)
        os.close(info_w)
        os.close(filt)
        for sock in udp:
            sock.close()
    try:
        try:
            info = _read_info(info_r)
        except SandboxError:
            proc.kill()
            _, err = proc.communicate(timeout=5)
            said = err.decode(errors="replace").strip()
            raise SandboxError(f"tenant {rec['name']}: bubblewrap failed: {said}{_userns_hint()}") from None
        pid = int(info["child-pid"])
        _write_maps(pid, base)
        os.write(block_w, b"1")
    finally:
        os.close(info_r)
        os.close(block_w)
    assert proc.stderr is not None
    proc.stderr.close()
    # Ready when the namespaces are mapped and the relay listens in them.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if _children(pid) and _relay_listens(pid):
            return pid
        if start_time(pid) is None:
            break
        time.sleep(0.005)
    raise SandboxError(f"tenant {rec['name']}: its sandbox did not come up{_userns_hint()}")


def _relay_listens(pid: int) -> bool:
    try:
        lines = Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]
    except OSError:
        return False
    want = f":{RELAY_PORT:04X}"
    return any(f[1].endswith(want) and f[3] == "0A" for f in (ln.split() for ln in lines) if len(f) > 3)


def _userns_hint() -> str:
    try:
        if int(Path("/proc/sys/user/max_user_namespaces").read_text()) == 0:
            return " (user namespaces are off on this host: sysctl user.max_user_namespaces=10000)"
    except (OSError, ValueError):
        pass
    return ""


# -- grants ---------------------------------------------------------------------------


def tenant_can_reach(path: Path, base: int, write: bool = False) -> str | None:
    """Why the tenant's root (host uid ``base``) could not use ``path``, or None. A tenant sees
    host files as an unprivileged user does: every directory on the way must let others
    search it."""
    path = Path(os.path.abspath(path))
    parts = list(path.parents)[::-1] + [path]
    for p in parts[:-1]:
        try:
            st = os.stat(p)
        except OSError as e:
            return f"{p}: {e.strerror}"
        if not allows(st, base, 0o1):
            return f"{p} (mode {stat.S_IMODE(st.st_mode):04o}, owner {st.st_uid}) does not let others in"
    try:
        st = os.stat(path)
    except OSError as e:
        return f"{path}: {e.strerror}"
    if write and not allows(st, base, 0o2):
        return (
            f"{path} (mode {stat.S_IMODE(st.st_mode):04o}, owner {st.st_uid}) is not writable by "
            f"the tenant's root, host uid {base}: chown -R {base}:{base} {path}"
        )
    return None


def allows(st: os.stat_result, base: int, bit: int) -> bool:
    if base <= st.st_uid < base + TENANT_UID_COUNT:
        return bool(st.st_mode & (bit << 6))
    if base <= st.st_gid < base + TENANT_UID_COUNT:
        return bool(st.st_mode & (bit << 3))
    return bool(st.st_mode & bit)


_SYS_OPENAT2 = 437  # x86_64 and aarch64 alike
_RESOLVE_NO_SYMLINKS = 0x04


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


def _open_no_symlinks(path: str) -> int:
    """An O_PATH descriptor of ``path``, refused (ELOOP) if any part of it is a symbolic link."""
    how = _OpenHow(os.O_PATH | os.O_CLOEXEC, 0, _RESOLVE_NO_SYMLINKS)
    fd = _libc.syscall(_SYS_OPENAT2, -100, os.fsencode(path), ctypes.byref(how), ctypes.sizeof(how))
    if fd < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), path)
    return int(fd)


def _tenant_made_link(path: Path, base: int) -> str | None:
    """Why ``path`` cannot be trusted to lead where the operator meant, or None: a symbolic
    link on the way (followed as the kernel does) that the tenant could have put there, in a
    directory it may write (one granted to it, or one anyone may write unless it is sticky
    and the link is not the tenant's). Where it points is then the tenant's choice."""
    todo = list(Path(os.path.abspath(path)).parts[1:])
    cur, hops = "/", 0
    while todo:
        name = todo.pop(0)
        if name == "..":
            cur = os.path.dirname(cur)
            continue
        nxt = os.path.join(cur, name)
        try:
            st = os.lstat(nxt)
            if not stat.S_ISLNK(st.st_mode):
                cur = nxt
                continue
            parent = os.stat(cur)
            target = os.readlink(nxt)
        except OSError:
            return None  # what is not there is reported by tenant_can_reach
        sticky = parent.st_mode & stat.S_ISVTX
        owned = base <= st.st_uid < base + TENANT_UID_COUNT
        if allows(parent, base, 0o2) and (owned or not sticky):
            return (
                f"{nxt} is a symbolic link in a directory the tenant may write: grant the "
                "path it should lead to instead"
            )
        hops += 1
        if hops > 40:
            return f"{path}: too many levels of symbolic links"
        if target.startswith("/"):
            cur = "/"
        todo[:0] = list(Path(target).parts[1:] if target.startswith("/") else Path(target).parts)
    return None


@dataclass(frozen=True)
class Grant:
    """A host path a tenant's program is given: opened by the launcher (root) before
    bubblewrap runs, and bound from that descriptor. bubblewrap runs as the tenant and would
    resolve a path itself, following whatever symbolic links the tenant put on the way (a
    grant inside another grant can be replaced by a link to the host's /tmp)."""

    where: str  # where it appears in the sandbox: where it is on the host
    fd: int
    write: bool


def open_grants(rec: dict[str, Any], rw: Sequence[Path], ro: Sequence[Path]) -> list[Grant]:
    """The grants opened and checked, or SandboxError with the reason (nothing left open)."""
    base = int(rec["uid_base"])
    out: list[Grant] = []
    try:
        for paths, write in ((rw, True), (ro, False)):
            for p in paths:
                flag = "--rw" if write else "--ro"
                real = os.path.realpath(p)
                why = _tenant_made_link(p, base) or tenant_can_reach(Path(real), base, write)
                if why:
                    raise SandboxError(f"{flag} {p}: {why}")
                try:
                    fd = _open_no_symlinks(real)
                    out.append(Grant(real, fd, write))  # links to it still lead there
                    checked, opened = os.stat(real), os.fstat(fd)
                    same = (checked.st_dev, checked.st_ino) == (opened.st_dev, opened.st_ino)
                except OSError:
                    same = False
                if not same:
                    raise SandboxError(f"{flag} {p}: {real} changed while it was opened; try again")
    except BaseException:
        for g in out:
            os.close(g.fd)
        raise
    return out


FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)


def _view(rec: dict[str, Any]) -> list[str]:
    """The files every process of the tenant sees (bubblewrap's mount options): the host
    read-only, its private directories, its resolver, GuestLib and the engine's socket."""
    view = ["--ro-bind", "/", "/", "--proc", "/proc", "--dev", "/dev"]
    for where, d in private_dirs(Path(rec["fs"])).items():
        view += ["--bind", str(d), where]
    return view + [
        "--ro-bind",
        rec["resolv_conf"],
        "/etc/resolv.conf",
        "--ro-bind",
        str(GUESTLIB_HOST_DIR),
        GUESTLIB_DIR,
        "--bind",
        str(ENGINE_SOCKET),
        str(ENGINE_SOCKET),
    ]


def command(
    rec: dict[str, Any], holder_pid: int, argv: Sequence[str], grants: Sequence[Grant], env: dict[str, str]
) -> tuple[list[str], list[int]]:
    """bubblewrap's command line to run ``argv`` in the tenant, and the descriptors it needs
    (the caller closes them once bubblewrap runs). bubblewrap runs as the tenant's root and
    opens the paths it binds with that uid's rights: each is one a tenant may reach (the
    private directories and NetKernel's files under /run/netkernel); grants come opened."""
    fds: list[int] = []
    try:
        fds.append(os.open(f"/proc/{holder_pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC))
        fds.append(os.open(f"/proc/{holder_pid}/ns/pid", os.O_RDONLY | os.O_CLOEXEC))
        fds.append(os.open(seccomp_filter(), os.O_RDONLY | os.O_CLOEXEC))
    except OSError as e:
        for n in fds:
            os.close(n)
        raise SandboxError(f"tenant {rec['name']}: cannot open {e.filename}: {e.strerror}") from None
    cmd = [
        bwrap(),
        "--userns",
        str(fds[0]),
        "--pidns",
        str(fds[1]),
        "--uid",
        "0",
        "--gid",
        "0",
        "--unshare-cgroup",
        "--die-with-parent",
        *_view(rec),
    ]
    for g in grants:
        cmd += ["--bind-fd" if g.write else "--ro-bind-fd", str(g.fd), g.where]
    cmd += ["--cap-drop", "ALL"]
    for cap in CAPABILITIES:
        cmd += ["--cap-add", cap]
    for key, value in env.items():
        cmd += ["--setenv", key, value]
    cmd += ["--seccomp", str(fds[2]), "--", *argv]
    return cmd, fds


def install_guestlib() -> None:
    """GuestLib and the relay where every tenant can read them: the package may live under a
    directory only root may enter (a pyenv under /root), and bubblewrap opens them as the
    tenant's root."""
    GUESTLIB_HOST_DIR.mkdir(mode=0o755, parents=True, exist_ok=True)
    for name, mode in (("libnetkernel.so", 0o644), (RELAY_NAME, 0o755), (VM_BRIDGE_NAME, 0o755)):
        tmp = GUESTLIB_HOST_DIR / f".{name}.new"
        shutil.copyfile(libdir() / name, tmp)
        os.chmod(tmp, mode)
        os.replace(tmp, GUESTLIB_HOST_DIR / name)


def tenant_env(env: dict[str, str], name: str) -> dict[str, str]:
    env = dict(env)
    old = env.get("LD_PRELOAD", "").strip()
    lib = f"{GUESTLIB_DIR}/libnetkernel.so"
    # GuestLib first so its socket() wins over any other preloaded library.
    env["LD_PRELOAD"] = f"{lib}:{old}" if old else lib
    env["NETKERNEL_SOCKET"] = str(ENGINE_SOCKET)
    env["NETKERNEL_TENANT"] = name
    env.setdefault("TMPDIR", "/var/tmp")  # /tmp is the host's, read-only
    return env


def run(rec: dict[str, Any], argv: Sequence[str], rw: Sequence[Path] = (), ro: Sequence[Path] = ()) -> int:
    """Run ``argv`` in tenant ``rec`` (the daemon's tenant record) and return its exit status
    (128+N if killed by signal N). Signals sent to us are forwarded to it."""
    grants = open_grants(rec, rw, ro)
    try:
        pid = holder(rec)
        # The program's environment goes in with --setenv: bubblewrap's own must not preload
        # GuestLib (it is not where bubblewrap starts).
        env = tenant_env(dict(os.environ), rec["name"])
        cmd, fds = command(rec, pid, argv, grants, env)
    except BaseException:
        for g in grants:
            os.close(g.fd)
        raise
    fds += [g.fd for g in grants]
    ooms = cgroups.oom_kills(rec.get("cgroups") or {})  # to tell an OOM kill from others
    info_r, info_w = os.pipe2(os.O_CLOEXEC)
    cmd[1:1] = ["--info-fd", str(info_w)]
    own_env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    try:
        proc = subprocess.Popen(
            cmd,
            pass_fds=(*fds, info_w),
            env=own_env,
            close_fds=True,
            preexec_fn=lambda: _restore_signals_and_enter(rec, pid),
        )
    except subprocess.SubprocessError as e:
        raise SandboxError(f"tenant {rec['name']}: cannot enter it: {e}") from None
    finally:
        for n in fds:
            os.close(n)
        os.close(info_w)
    child: list[int] = []
    previous = {
        sig: signal.signal(sig, lambda s, _f: _forward(child or [proc.pid], s)) for sig in FORWARDED_SIGNALS
    }
    try:
        try:
            info = _read_info(info_r, timeout=30)
            child.append(int(info["child-pid"]))
        except SandboxError:
            pass  # bubblewrap failed before starting the program: its exit status says so
        finally:
            os.close(info_r)
        status = proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    # bubblewrap exits with its program's status (128+N after signal N); killed itself: -N.
    status = 128 - status if status < 0 else status
    if status == 128 + signal.SIGKILL:
        print(f"netkernel: {argv[0]}: killed (SIGKILL) {_why_killed(rec, ooms)}", file=sys.stderr)
    return status


def _why_killed(rec: dict[str, Any], ooms_before: int | None) -> str:
    """What most likely sent a tenant's program SIGKILL, for the one who ran it."""
    ooms = cgroups.oom_kills(rec.get("cgroups") or {})
    if ooms is not None and ooms_before is not None and ooms > ooms_before:
        return (
            "by the kernel's OOM killer, at the tenant's memory limit (max_process_memory; "
            "`netkernel tenant set NAME --max-process-memory SIZE`)"
        )
    # The namespace's init SIGKILLs the rest as it exits, and is a zombie only once they are
    # all gone: a moment after our program.
    held = _holder_record(rec["name"])
    deadline = time.monotonic() + 0.5
    while held is not None and _running(held[0]) and time.monotonic() < deadline:
        time.sleep(0.01)
    if held is None or not _running(held[0]):
        return (
            "with the tenant's sandbox, which ended (its pid namespace's init died, "
            "or all its processes were killed)"
        )
    return "by a signal from outside NetKernel's limits (kill -9, or a parent that died)"


def _restore_signals_and_enter(rec: dict[str, Any], holder_pid: int) -> None:
    for sig in FORWARDED_SIGNALS + (signal.SIGPIPE, signal.SIGXFSZ):
        signal.signal(sig, signal.SIG_DFL)  # Python ignores SIGPIPE; programs must not
    _become_tenant(rec, holder_pid)


def _forward(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
