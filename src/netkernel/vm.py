"""VM tenants: a QEMU guest with no NIC at all, run as a tenant.

`netkernel vm start NAME` creates tenant NAME (if needed) and starts a supervisor process,
which boots QEMU *inside the tenant's sandbox* (the tenant's user, network namespace with only
`lo`, cgroup and seccomp filter), so the VM is a tenant process like any other: `ps`, limits,
`down` and `tenant delete` apply to it. The guest boots a stock Debian kernel with a small
initramfs built here (busybox, the kernel's own virtio, 9p and overlay modules, and
netkernel-vm-agent); it sees the files the tenant sees, read-only over 9p from QEMU (which
runs with the tenant's rights, so the guest can read no more than a namespace tenant), with a
writable tmpfs overlay. The supervisor holds the guest's exec port, a virtio-serial port
(include/netkernel/vmport.h), and serves `netkernel vm exec` on a root-only socket.

The guest has no network device: neither virtio-net nor user networking.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import lzma
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import api, cgroups, pids
from . import sandbox as launcher
from .config import ENGINE_SOCKET, LOG_FILE, RUN_DIR, STATE_DIR, libdir
from .errors import NetKernelError

VM_DIR = RUN_DIR / "vms"  # root only: NAME.json (state), NAME.sock (exec), NAME.stop
CACHE_DIR = STATE_DIR / "vm"  # initramfs images, readable by tenants (QEMU opens them)
LOG_DIR = LOG_FILE.parent
AGENT = "netkernel-vm-agent"
PORT_NAME = "nk.exec"
NET_PORT_NAME = "nk.net"
GUEST_SOCKET = "/run/netkernel/engine.sock"  # csrc/vm/vm.h
GUEST_LIB = "/run/netkernel/lib/libnetkernel.so"
QEMU = "qemu-system-x86_64"
BOOT_TIMEOUT = 90.0  # TCG on a busy 2-core machine: a normal boot takes 3-8 s
# The guest's kernel modules, in the order of their dependencies (resolved from modules.dep).
MODULES = ("virtio_pci", "virtio_console", "9pnet_virtio", "9p", "overlay", "unix_diag")

# Frames of the exec port (include/netkernel/vmport.h).
FRAME = struct.Struct("<IHH")
MAX_PAYLOAD = 65536
MAX_CHANNELS = 256
EXEC, STDIN, STDIN_EOF, SIGNAL, POWEROFF = 1, 2, 3, 4, 5
READY, STDOUT, STDERR, EXIT = 16, 17, 18, 19

_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")
_SIZE_RE = re.compile(r"^([0-9]+)([MG])$", re.I)

# The guest's /init (busybox): modules, the host's files (9p, read-only) under a tmpfs
# overlay, the usual mounts in that root, then the agent as init.
INIT = """#!/bin/busybox sh
B=/bin/busybox
$B mount -t proc proc /proc
$B mount -t sysfs sys /sys
$B mount -t devtmpfs dev /dev
$B ip link set lo up  # the only device; the DNS relay listens on it (127.0.0.53)
for m in $($B cat /modules/order); do
    $B insmod /modules/$m.ko || echo "netkernel-vm: cannot load module $m"
done
$B mkdir -p /mnt/lower /mnt/rw /mnt/root
$B mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=262144,cache=loose host /mnt/lower \
    || echo "netkernel-vm: cannot mount the host's files"
$B mount -t tmpfs -o mode=755 rw /mnt/rw
$B mkdir -p /mnt/rw/upper /mnt/rw/work
$B mount -t overlay -o lowerdir=/mnt/lower,upperdir=/mnt/rw/upper,workdir=/mnt/rw/work root /mnt/root
$B mount -t proc proc /mnt/root/proc
$B mount -t sysfs sys /mnt/root/sys
$B mount -o bind /dev /mnt/root/dev
$B mkdir -p /mnt/root/dev/pts /mnt/root/dev/shm
$B mount -t devpts devpts /mnt/root/dev/pts
# /run is the host's own (its sockets mean nothing here); /tmp comes from the host, written to the overlay.
for d in /run /dev/shm; do $B mount -t tmpfs -o mode=1777 tmp /mnt/root$d; done
# GuestLib, from the tenant's view of the host, where the guest's programs preload it; the
# agent answers for the engine on /run/netkernel/engine.sock.
$B mkdir -p /mnt/root/run/netkernel/lib
$B cp /mnt/lower/run/netkernel/lib/libnetkernel.so /mnt/root/run/netkernel/lib/ \
    || echo "netkernel-vm: no GuestLib: the guest's programs will have no network"
$B hostname "$($B sed -n 's/.*nkname=\\([^ ]*\\).*/\\1/p' /proc/cmdline)"
exec /agent
"""


class VMError(NetKernelError):
    pass


@dataclass
class Kernel:
    version: str
    image: Path
    modules: Path


def check_name(name: str) -> None:
    if not _NAME_RE.match(name):
        raise VMError(
            f"bad VM name {name!r}: use 1-32 of a-z, 0-9, '-' and '_', starting with a letter or digit"
        )


def parse_memory(s: str) -> int:
    """MiB from '512M' or '1G'."""
    m = _SIZE_RE.match(s.strip())
    if not m:
        raise VMError(f"bad memory size {s!r}: give it as 512M or 2G")
    mib = int(m.group(1)) * (1024 if m.group(2).upper() == "G" else 1)
    if not 128 <= mib <= 65536:
        raise VMError(f"memory {s}: a guest needs at least 128M (and at most 64G)")
    return mib


def find_kernel() -> Kernel:
    """A Debian kernel whose modules include 9p (the generic linux-image-amd64 does; the
    cloud kernel has no 9p)."""
    found = []
    for image in sorted(Path("/boot").glob("vmlinuz-*"), reverse=True):
        version = image.name[len("vmlinuz-") :]
        mods = Path("/lib/modules") / version
        if any((mods / "kernel/fs/9p" / f).exists() for f in ("9p.ko", "9p.ko.xz")):
            found.append(Kernel(version, image, mods))
    if not found:
        raise VMError(
            "no guest kernel: VM tenants boot a Debian kernel with 9p support "
            "(apt-get install linux-image-amd64 qemu-system-x86)"
        )
    return found[0]


def qemu_binary() -> str:
    path = shutil.which(QEMU)
    if not path:
        raise VMError(f"{QEMU} is not installed (apt-get install qemu-system-x86)")
    return path


def _module_order(k: Kernel) -> list[str]:
    deps: dict[str, list[str]] = {}
    for line in (k.modules / "modules.dep").read_text().splitlines():
        mod, _, rest = line.partition(":")
        deps[mod] = rest.split()
    by_name = {_mod_name(m): m for m in deps}
    order: list[str] = []

    def add(m: str) -> None:
        for d in reversed(deps[m]):
            add(d)
        if m not in order:
            order.append(m)

    for want in MODULES:
        if want not in by_name:
            raise VMError(f"kernel {k.version} has no module {want}")
        add(by_name[want])
    return order


def _mod_name(path: str) -> str:
    base = os.path.basename(path)
    return base.split(".ko")[0]


def _cpio(entries: list[tuple[str, int, bytes]]) -> bytes:
    """A newc cpio archive (what the kernel unpacks as its initramfs)."""
    out = bytearray()
    for ino, (name, mode, data) in enumerate([*entries, ("TRAILER!!!", 0, b"")], start=1):
        n = name.encode() + b"\0"
        fields = (ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(n), 0)
        out += b"070701" + b"".join(b"%08X" % v for v in fields) + n
        out += b"\0" * (-len(out) % 4)
        out += data
        out += b"\0" * (-len(out) % 4)
    return bytes(out + b"\0" * (-len(out) % 512))


def initramfs(k: Kernel) -> Path:
    """The guest's initramfs for kernel ``k``, built once per kernel and agent."""
    agent = (libdir() / AGENT).read_bytes()
    busybox = Path("/bin/busybox")
    if not busybox.exists() or b"statically linked" not in subprocess.run(
        ["file", "-L", str(busybox)], capture_output=True
    ).stdout.replace(b"static-pie linked", b"statically linked"):
        raise VMError("VM tenants need a static busybox (apt-get install busybox-static)")
    order = _module_order(k)
    key = hashlib.sha256(agent + INIT.encode() + k.version.encode() + busybox.read_bytes()).hexdigest()[:16]
    out = CACHE_DIR / f"initramfs-{k.version}-{key}.cpio"
    if out.exists():
        return out
    entries: list[tuple[str, int, bytes]] = [
        (d, 0o40755, b"") for d in ("bin", "dev", "proc", "sys", "mnt", "modules")
    ]
    entries += [("bin/busybox", 0o100755, busybox.read_bytes()), ("agent", 0o100755, agent)]
    entries.append(("init", 0o100755, INIT.encode()))
    for m in order:
        data = (k.modules / m).read_bytes()
        if m.endswith(".xz"):
            data = lzma.decompress(data)
        entries.append((f"modules/{_mod_name(m)}.ko", 0o100644, data))
    entries.append(("modules/order", 0o100644, " ".join(_mod_name(m) for m in order).encode()))
    CACHE_DIR.mkdir(mode=0o755, parents=True, exist_ok=True)
    os.chmod(CACHE_DIR, 0o755)
    tmp = out.with_suffix(".new")
    tmp.write_bytes(_cpio(entries))
    os.chmod(tmp, 0o644)
    os.replace(tmp, out)
    return out


# ---- state -------------------------------------------------------------------------------


def _state_path(name: str) -> Path:
    return VM_DIR / f"{name}.json"


def _sock_path(name: str) -> Path:
    return VM_DIR / f"{name}.sock"


def log_path(name: str) -> Path:
    return LOG_DIR / f"netkernel-vm-{name}.log"


def read_state(name: str) -> dict[str, Any] | None:
    try:
        st: dict[str, Any] = json.loads(_state_path(name).read_text())
    except (OSError, ValueError):
        return None
    if not pids.alive(int(st.get("supervisor", 0))):
        return None
    return st


def vms() -> list[dict[str, Any]]:
    out = []
    for p in sorted(VM_DIR.glob("*.json")) if VM_DIR.exists() else []:
        st = read_state(p.stem)
        if st:
            out.append(st)
    return out


# ---- frames -------------------------------------------------------------------------------


def send_frame(sock: socket.socket, kind: int, chan: int, payload: bytes = b"") -> None:
    sock.sendall(FRAME.pack(len(payload), kind, chan) + payload)


def _read_exact(f: socket.socket, n: int) -> bytes | None:
    buf = b""
    while len(buf) < n:
        got = f.recv(n - len(buf))
        if not got:
            return None
        buf += got
    return buf


def read_frame(f: socket.socket) -> tuple[int, int, bytes] | None:
    """(type, chan, payload), or None at the end of the stream. A frame longer than the
    protocol allows ends it too (the other side is not trusted)."""
    head = _read_exact(f, FRAME.size)
    if head is None:
        return None
    length, kind, chan = FRAME.unpack(head)
    if length > MAX_PAYLOAD:
        raise VMError(f"a frame of {length} bytes on the exec port")
    payload = _read_exact(f, length) if length else b""
    if payload is None:
        return None
    return kind, chan, payload


# ---- the supervisor ----------------------------------------------------------------------


class Supervisor:
    """Boots the guest in the tenant's sandbox, holds its exec port and serves `vm exec`."""

    def __init__(self, name: str, tenant: dict[str, Any], memory: int, cpus: int, accel: str) -> None:
        self.name, self.tenant, self.memory, self.cpus, self.accel = name, tenant, memory, cpus, accel
        self.lock = threading.Lock()  # writes to the port
        self.clients: dict[int, socket.socket] = {}
        self.port: socket.socket | None = None
        self.qemu: subprocess.Popen[bytes] | None = None
        self.qemu_pid = 0

    def qemu_argv(self, kernel: Kernel, initrd: Path, port_fd: int, net_fd: int) -> list[str]:
        accel = "kvm" if self.accel == "kvm" else "tcg"
        return [
            qemu_binary(),
            "-accel",
            accel,
            "-cpu",
            "host" if accel == "kvm" else "max",
            "-smp",
            str(self.cpus),
            "-m",
            f"{self.memory}M",
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
            "-nic",
            "none",  # no network device of any kind
            "-serial",
            "stdio",
            "-kernel",
            str(kernel.image),
            "-initrd",
            str(initrd),
            "-append",
            f"console=ttyS0 quiet panic=-1 tsc=reliable nkname={self.name}",
            "-virtfs",
            "local,path=/,mount_tag=host,security_model=none,readonly=on,multidevs=remap",
            "-device",
            "virtio-serial-pci",
            "-chardev",
            f"socket,id=port,fd={port_fd}",
            "-device",
            f"virtserialport,chardev=port,name={PORT_NAME}",
            "-chardev",
            f"socket,id=net,fd={net_fd}",
            "-device",
            f"virtserialport,chardev=net,name={NET_PORT_NAME}",
        ]

    def boot(self) -> None:
        kernel = find_kernel()
        initrd = initramfs(kernel)
        host_end, guest_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        net_host, net_guest = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        for s in (guest_end, net_host, net_guest):
            s.set_inheritable(True)
        self.port = host_end
        # The bridge registers with the engine, gives the region to QEMU as an ivshmem device
        # and starts it; then it relays the guest's network port (csrc/vm/bridge.c).
        bridge = str(launcher.GUESTLIB_HOST_DIR / launcher.VM_BRIDGE_NAME)
        argv = [
            bridge,
            str(net_host.fileno()),
            "--",
            *self.qemu_argv(kernel, initrd, guest_end.fileno(), net_guest.fileno()),
        ]
        holder = launcher.holder(self.tenant)
        # Neither gets GuestLib: the bridge talks to the engine itself, QEMU has no sockets.
        env = {
            "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME": "/",
            "TMPDIR": "/var/tmp",
            "NETKERNEL_SOCKET": str(ENGINE_SOCKET),
        }
        cmd, fds = launcher.command(self.tenant, holder, argv, [], env)
        if self.accel == "kvm":  # the sandbox's /dev has no kvm of its own
            cmd[cmd.index("--seccomp") : cmd.index("--seccomp")] = ["--dev-bind", "/dev/kvm", "/dev/kvm"]
        log = open(log_path(self.name), "ab")  # noqa: SIM115 (QEMU's serial console, for its life)
        try:
            self.qemu = subprocess.Popen(
                cmd,
                pass_fds=(*fds, guest_end.fileno(), net_host.fileno(), net_guest.fileno()),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                close_fds=True,
                preexec_fn=lambda: launcher._restore_signals_and_enter(self.tenant, holder),
            )
        finally:
            for n in fds:
                os.close(n)
            for s in (guest_end, net_host, net_guest):
                s.close()
            log.close()
        started = time.monotonic()
        host_end.settimeout(BOOT_TIMEOUT)
        try:
            frame = read_frame(host_end)
        except (TimeoutError, OSError, VMError) as e:
            raise VMError(f"the guest did not come up: {e}") from None
        if frame is None or frame[0] != READY:
            raise VMError("the guest did not come up (see its console log)")
        host_end.settimeout(None)
        (uptime_ms,) = struct.unpack("<I", frame[2][:4].ljust(4, b"\0"))
        self.boot_s = time.monotonic() - started
        self.guest_uptime_s = uptime_ms / 1000

    def serve(self) -> None:
        VM_DIR.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = _sock_path(self.name)
        path.unlink(missing_ok=True)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(path))
        os.chmod(path, 0o600)
        listener.listen(64)
        state = {
            "name": self.name,
            "tenant": self.name,
            "supervisor": os.getpid(),
            "qemu": self.qemu.pid if self.qemu else 0,
            # Start times: a number alone may name another process by the time it is signalled.
            "qemu_start": launcher.start_time(self.qemu.pid) if self.qemu else None,
            "supervisor_start": launcher.start_time(os.getpid()),
            "memory_mib": self.memory,
            "cpus": self.cpus,
            "accel": self.accel,
            "boot_s": round(self.boot_s, 2),
            "guest_boot_s": self.guest_uptime_s,
            "started": time.time(),
            "ipv4": self.tenant.get("ipv4"),
            "ipv6": self.tenant.get("ipv6"),
        }
        tmp = _state_path(self.name).with_suffix(".new")
        tmp.write_text(json.dumps(state) + "\n")
        os.replace(tmp, _state_path(self.name))
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()
        threading.Thread(target=self._pump, daemon=True).start()
        assert self.qemu is not None
        self.qemu.wait()
        # The guest is gone: every `vm exec` waiting on it is told so (its socket closes).
        with self.lock:
            for c in self.clients.values():
                c.close()
            self.clients.clear()
        _state_path(self.name).unlink(missing_ok=True)
        path.unlink(missing_ok=True)

    def _pump(self) -> None:
        """Guest -> clients. The guest is untrusted: frames for unknown channels are dropped;
        a frame that breaks the protocol ends the VM (it hurts only itself)."""
        assert self.port is not None
        while True:
            try:
                frame = read_frame(self.port)
            except (VMError, OSError) as e:
                print(f"netkernel-vm {self.name}: {e}: stopping the VM", file=sys.stderr, flush=True)
                frame = None
            if frame is None:
                if self.qemu and self.qemu.poll() is None:
                    self.qemu.kill()
                return
            kind, chan, payload = frame
            with self.lock:
                client = self.clients.get(chan)
                if kind not in (STDOUT, STDERR, EXIT) or client is None:
                    continue
                try:
                    send_frame(client, kind, 0, payload)
                except OSError:
                    pass
                if kind == EXIT:
                    del self.clients[chan]
                    client.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            conn, _ = listener.accept()
            threading.Thread(target=self._client, args=(conn,), daemon=True).start()

    def _to_guest(self, kind: int, chan: int, payload: bytes = b"") -> None:
        assert self.port is not None
        with self.lock:
            send_frame(self.port, kind, chan, payload)

    def _client(self, conn: socket.socket) -> None:
        try:
            first = read_frame(conn)
            if first is None:
                return
            kind, _, payload = first
            if kind == POWEROFF:
                self._to_guest(POWEROFF, 0)
                if self.qemu:
                    try:
                        self.qemu.wait(timeout=15)
                    except subprocess.TimeoutExpired:
                        self.qemu.kill()
                return
            if kind != EXEC:
                return
            with self.lock:
                free = [c for c in range(1, MAX_CHANNELS) if c not in self.clients]
                if not free:
                    send_frame(conn, STDERR, 0, b"netkernel: too many commands running in this VM\n")
                    send_frame(conn, EXIT, 0, struct.pack("<i", 255))
                    return
                chan = free[0]
                self.clients[chan] = conn
            self._to_guest(EXEC, chan, payload)
            while True:
                frame = read_frame(conn)
                if frame is None:
                    # The client went away: its command is told as a terminal would tell it.
                    with self.lock:
                        if self.clients.get(chan) is conn:
                            send_frame(self.port, SIGNAL, chan, struct.pack("<I", signal.SIGHUP))  # type: ignore[arg-type]
                    return
                kind, _, payload = frame
                if kind in (STDIN, STDIN_EOF, SIGNAL):
                    self._to_guest(kind, chan, payload)
        except (OSError, VMError):
            return


def supervise(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="netkernel-vm-supervisor")
    ap.add_argument("name")
    ap.add_argument("--memory", type=int, required=True)
    ap.add_argument("--cpus", type=int, required=True)
    ap.add_argument("--accel", choices=("tcg", "kvm"), required=True)
    args = ap.parse_args(argv)
    tenant = api.call("tenant-create", name=args.name, kind="vm")["tenant"]
    # In the tenant's cgroups: what a hostile guest makes this process do (frames to parse)
    # is charged to the tenant, and ending the tenant ends its VM's supervisor too.
    cgroups.join(tenant.get("cgroups") or {})
    sup = Supervisor(args.name, tenant, args.memory, args.cpus, args.accel)
    signal.signal(signal.SIGTERM, lambda *_: sup.qemu.kill() if sup.qemu else sys.exit(1))
    try:
        sup.boot()
    except VMError as e:
        print(f"netkernel-vm {args.name}: {e}", file=sys.stderr, flush=True)
        if sup.qemu and sup.qemu.poll() is None:
            sup.qemu.kill()
            sup.qemu.wait()
        return 1
    sup.serve()
    return 0


# ---- what the CLI calls ------------------------------------------------------------------


def kvm_usable() -> str | None:
    """Why KVM cannot run a stock guest here, or None when it can. Only hardware KVM
    (kvm_intel, kvm_amd) counts: a software KVM such as kvm_pvm, which these machines have,
    cannot boot a stock kernel (../shared/reference/qemu-ivshmem)."""
    if not os.path.exists("/dev/kvm"):
        return "there is no /dev/kvm"
    mods = [m for m in ("kvm_intel", "kvm_amd") if os.path.exists(f"/sys/module/{m}")]
    if not mods:
        others = [m for m in ("kvm_pvm",) if os.path.exists(f"/sys/module/{m}")]
        return (
            "/dev/kvm is "
            + (others[0] if others else "not hardware KVM")
            + ", which cannot run a stock kernel"
        )
    return None


def accel_choice(force: str | None) -> str:
    """KVM where it works, TCG otherwise; ``force`` picks one."""
    why = kvm_usable()
    if force == "kvm" and why:
        raise VMError(f"--accel kvm: {why} (leave --accel out, or give --accel tcg)")
    if force:
        return force
    return "tcg" if why else "kvm"


def start(name: str, memory: int, cpus: int, accel: str, nsm: str | None) -> dict[str, Any]:
    check_name(name)
    if read_state(name):
        raise VMError(f"VM {name} is already running")
    qemu_binary()
    find_kernel()
    initramfs(find_kernel())  # its errors before anything starts
    api.call("tenant-create", name=name, nsm=nsm, kind="vm")
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    log = log_path(name)
    log.write_bytes(b"")
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "netkernel.vm",
                "supervise",
                name,
                "--memory",
                str(memory),
                "--cpus",
                str(cpus),
                "--accel",
                accel,
            ],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            start_new_session=True,
            close_fds=True,
        )
    deadline = time.monotonic() + BOOT_TIMEOUT + 10
    while time.monotonic() < deadline:
        st = read_state(name)
        if st:
            return st
        if proc.poll() is not None:
            tail = log.read_text(errors="replace").strip().splitlines()[-15:]
            raise VMError(f"VM {name} did not start:\n  | " + "\n  | ".join(tail) + f"\n(full log: {log})")
        time.sleep(0.1)
    proc.kill()
    raise VMError(f"VM {name} did not boot within {BOOT_TIMEOUT:.0f} s (log: {log})")


def _connect(name: str) -> socket.socket:
    check_name(name)
    if not read_state(name):
        raise VMError(f"no VM {name} is running (`netkernel vm list` shows those that are)")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(str(_sock_path(name)))
    except OSError as e:
        s.close()
        raise VMError(f"VM {name}: cannot reach its supervisor: {e.strerror}") from None
    return s


def stop(name: str) -> None:
    st = read_state(name)
    s = _connect(name)
    with s:
        send_frame(s, POWEROFF, 0)
        s.settimeout(15)  # the supervisor closes it once QEMU has exited
        try:
            s.recv(1)
        except OSError:
            pass
    # A guest that does not power off (or no longer reads its port) is stopped the hard way:
    # QEMU (bubblewrap, which takes it along) and the supervisor, each if it is still this VM's.
    deadline = time.monotonic() + 5
    while st and pids.alive(int(st["supervisor"])) and time.monotonic() < deadline:
        time.sleep(0.05)
    if st and pids.alive(int(st["supervisor"])):
        for key in ("qemu", "supervisor"):
            since: str | None = st.get(f"{key}_start")

            def same(p: int, since: str | None = since) -> bool:
                return since is not None and launcher.start_time(p) == since

            pids.signal_if(int(st[key]), signal.SIGKILL, same)


def guest_env(name: str) -> dict[str, str]:
    env = {
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME": "/root",
        "NETKERNEL_TENANT": name,
        # The guest's programs get their sockets from NetKernel, as a namespace tenant's.
        "LD_PRELOAD": GUEST_LIB,
        "NETKERNEL_SOCKET": GUEST_SOCKET,
    }
    for k in ("TERM", "LANG", "LC_ALL"):
        if k in os.environ:
            env[k] = os.environ[k]
    return env


def exec_(name: str, argv: list[str], cwd: str = "/", env: dict[str, str] | None = None) -> int:
    """Runs argv in the VM with our stdin, stdout and stderr; its exit status."""
    s = _connect(name)
    env = {**guest_env(name), **(env or {})}
    payload = (
        cwd.encode()
        + b"\0"
        + b"".join(a.encode() + b"\0" for a in argv)
        + b"\0"
        + b"".join(f"{k}={v}".encode() + b"\0" for k, v in env.items())
        + b"\0"
    )
    if len(payload) > MAX_PAYLOAD:
        raise VMError("the command and its environment are longer than 64 KiB")
    send_frame(s, EXEC, 0, payload)

    def stdin_pump() -> None:
        try:
            while True:
                data = os.read(0, MAX_PAYLOAD)
                if not data:
                    break
                send_frame(s, STDIN, 0, data)
            send_frame(s, STDIN_EOF, 0)
        except OSError:
            pass

    threading.Thread(target=stdin_pump, daemon=True).start()
    forwarded = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    old = {
        sig: signal.signal(sig, lambda n, _f: send_frame(s, SIGNAL, 0, struct.pack("<I", n)))
        for sig in forwarded
    }
    try:
        while True:
            frame = read_frame(s)
            if frame is None:
                print(f"netkernel: VM {name} went away", file=sys.stderr)
                return 255
            kind, _, payload = frame
            if kind == STDOUT:
                sys.stdout.buffer.write(payload)
                sys.stdout.buffer.flush()
            elif kind == STDERR:
                sys.stderr.buffer.write(payload)
                sys.stderr.buffer.flush()
            elif kind == EXIT:
                (status,) = struct.unpack("<i", payload[:4].ljust(4, b"\0"))
                return int(status)
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)
        s.close()


def main(argv: list[str]) -> int:
    if argv[:1] == ["supervise"]:
        return supervise(argv[1:])
    print(
        "usage: python3 -m netkernel.vm supervise NAME ... (started by `netkernel vm start`)", file=sys.stderr
    )
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
