"""The daemon's child processes: the engine, and the stack of each external NSM (lwIP). Each
is started, waited for until it is ready, watched and stopped here.

A dead NSM process is restarted. A dead engine is restarted too, at once: the daemon owns the
control socket tenants connect to and keeps what they hold of the engine (keep.py), so the
next engine adopts every tenant's region and listeners; the connections that were open are
reset. An engine that dies CRASH_LIMIT times within CRASH_WINDOW seconds is left down, and
`status` says why. The functions take the
Daemon whose processes they are. start_engine and
register_nsm run at start-up and, for register_nsm, within add_nsm with the Daemon's lock
held; the NSM watcher thread takes that lock itself before it starts a new process, so that
it cannot race an NSM's removal.
"""

from __future__ import annotations

import logging
import os
import resource
import select
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from . import netns
from .config import ADMIN_SOCKET, ENGINE_PID_FILE, ENGINE_SOCKET, engine_binary, format_rate, lwip_binary
from .daemon_log import engine_log_relay, log, log_event
from .engine import tenant_add_line, tenant_id, tenant_set_line, wait_ready
from .errors import EngineError, NSMError
from .fabric import LWIP_TAP
from .records import NSM

if TYPE_CHECKING:
    from .daemon import Daemon


def start_nsm_process(d: Daemon, nsm: NSM) -> None:
    c = d.config
    cmd = [
        "ip",
        "netns",
        "exec",
        nsm.netns,
        str(lwip_binary()),
        "--engine",
        str(nsm.socket),
        "--tap",
        LWIP_TAP,
        "--index",
        str(nsm.index + 1),
        "--prefix4",
        str(c.ipv4_subnet.prefixlen),
        "--prefix6",
        str(c.ipv6_prefix.prefixlen),
    ]
    # It is a network stack the engine waits on (a socket() on it is a round trip while
    # every tenant waits): the engine's CPU weight, not a tenant program's.
    nice = c.engine_nice
    if nice:
        cmd = ["nice", "-n", str(nice), *cmd]
    # Its log goes where the daemon's goes; its own session keeps terminal signals away.
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, start_new_session=True)
    if nice:
        try:
            netns.set_autogroup_nice(proc.pid, nice)
        except OSError as e:
            log.warning("cannot set NSM %s's autogroup nice to %d (%s)", nsm.name, nice, e)
    d.nsm_procs[nsm.name] = proc
    log_event("nsm_process_started", nsm=nsm.name, pid=proc.pid)
    threading.Thread(
        target=_watch_nsm_process, args=(d, nsm, proc), name=f"nsm-{nsm.name}", daemon=True
    ).start()


def _wait_nsm_up(d: Daemon, nsm: NSM, connects: int, timeout: float = 10.0) -> None:
    """Until the engine has seen process number `connects` of the NSM connect."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stats = d.engine_stats()
        s = stats.nsm(nsm.name) if stats else None
        if s and s.up and s.connects >= connects:
            return
        proc = d.nsm_procs.get(nsm.name)
        if proc is not None and proc.poll() is not None and connects <= 1:
            raise NSMError(
                f"NSM {nsm.name!r}: its process exited with status "
                f"{proc.returncode} before it connected (see the daemon's log)"
            )
        time.sleep(0.02)
    raise NSMError(
        f"NSM {nsm.name!r}: its process did not connect to the engine within "
        f"{timeout:.0f} s (see the daemon's log)"
    )


def _watch_nsm_process(d: Daemon, nsm: NSM, proc: subprocess.Popen[bytes]) -> None:
    """Restart an external NSM that died: the engine fails its connections, the new
    process gets the tenants' regions and the listeners back."""
    started = time.monotonic()
    status = proc.wait()
    if d.stopping or d.nsm_procs.get(nsm.name) is not proc:
        return
    # A process that dies at once (within 2 s) waits 1 s before the next try: not a loop.
    delay = 0.05 if time.monotonic() - started > 2 else 1.0
    log_event(
        "nsm_process_exited",
        logging.WARNING,
        nsm=nsm.name,
        pid=proc.pid,
        status=status,
        action=f"restarting in {delay:g} s",
    )
    if d.stop_event.wait(delay):
        return
    with d.lock:
        if d.stopping or d.nsm_procs.get(nsm.name) is not proc:
            return
        start_nsm_process(d, nsm)


def stop_nsm_process(d: Daemon, name: str) -> None:
    proc = d.nsm_procs.pop(name, None)
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def register_nsm(d: Daemon, nsm: NSM) -> None:
    """Tell the engine of the NSM (and of its bandwidth); an external one's process is
    started and has connected to the engine when this returns."""
    path = str(netns.netns_path(nsm.netns))
    if nsm.external:
        stats = d.engine_stats()
        s = stats.nsm(nsm.name) if stats else None
        if s is None:
            d.engine_client.nsm_add(nsm.name, path, str(nsm.socket))
        # A stack whose engine died waits for the next one and connects by itself.
        proc = d.nsm_procs.get(nsm.name)
        if proc is None or proc.poll() is not None:
            start_nsm_process(d, nsm)
        _wait_nsm_up(d, nsm, 1)
    else:
        d.engine_client.nsm_add(nsm.name, path)
    if nsm.config.bandwidth:
        try:
            d.engine_client.nsm_set(nsm.name, nsm.config.bandwidth)
        except EngineError as e:
            raise NSMError(
                f"NSM {nsm.name!r}: cannot set bandwidth {format_rate(nsm.config.bandwidth)}: {e}"
            ) from None


# The engine holds two descriptors per connection (its end of the proxy fd, the NSM's socket)
# and keeps some for itself (engine.h: its listeners, epoll, per tenant and per NSM).
ENGINE_FDS_PER_CONNECTION = 2
ENGINE_OWN_FDS = 256


@dataclass(frozen=True)
class FdLimit:
    """The descriptor limit the engine runs with, and what it means for connections."""

    limit: int
    wanted: int  # what the daemon asked for (fs.nr_open)
    raised: bool  # the hard limit could be raised to it

    @property
    def connections(self) -> int:
        return max(0, (self.limit - ENGINE_OWN_FDS) // ENGINE_FDS_PER_CONNECTION)

    def describe(self) -> str:
        text = f"about {self.connections:,} connections (engine descriptor limit {self.limit:,})"
        if not self.raised:
            text += (
                f"; the host's hard limit could not be raised to {self.wanted:,} "
                "(needs CAP_SYS_RESOURCE: run under systemd with LimitNOFILE=, or raise "
                "`ulimit -Hn` before `netkernel up`)"
            )
        return text


def raise_fd_limit() -> FdLimit:
    """Raise RLIMIT_NOFILE of the daemon, and so of the engine it starts, to fs.nr_open where
    the host allows it, else the soft limit to the hard one."""
    try:
        wanted = int(Path("/proc/sys/fs/nr_open").read_text())
    except (OSError, ValueError):
        wanted = 1 << 20
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    raised = hard == resource.RLIM_INFINITY or hard >= wanted
    if not raised:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, wanted))
            raised = True
        except (OSError, ValueError):
            pass
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    limit = wanted if soft == resource.RLIM_INFINITY else soft
    return FdLimit(limit=limit, wanted=wanted, raised=raised)


CRASH_LIMIT = 5  # engine deaths within CRASH_WINDOW after which it is left down
CRASH_WINDOW = 60.0


def control_socket() -> socket.socket:
    """The socket tenants' processes reach the engine on. The daemon makes it and keeps it
    across engines: sandboxes bind-mount the file, so a new socket at the path would not
    reach them, and a process that connects while no engine runs waits in its queue."""
    ENGINE_SOCKET.unlink(missing_ok=True)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    s.bind(str(ENGINE_SOCKET))
    # Tenant processes that dropped root (nginx workers) must still reach the engine;
    # it tells tenants apart by network namespace, not by file permissions.
    os.chmod(ENGINE_SOCKET, 0o666)
    s.listen(512)
    return s


def start_engine(d: Daemon, binary: Path | None = None) -> None:
    """Start an engine, hand it what the last one left, and register the NSMs with it."""
    binary = binary or engine_binary()
    d.fd_limit = raise_fd_limit()
    log.info("host limits allow %s", d.fd_limit.describe())
    ADMIN_SOCKET.unlink(missing_ok=True)
    if d.control_sock is None:
        d.control_sock = control_socket()
    ours, theirs = d.keeper.channel()
    ctl_fd = d.control_sock.fileno()
    cmd = [
        str(binary),
        "--control",
        str(ENGINE_SOCKET),
        "--admin",
        str(ADMIN_SOCKET),
        "--control-fd",
        str(ctl_fd),
        "--keep",
        str(theirs.fileno()),
    ]
    nice = d.config.engine_nice
    if nice:
        # nice(1) sets it before exec, so every engine thread inherits it (a later
        # setpriority reaches one thread only).
        cmd = ["nice", "-n", str(nice), *cmd]
    log.info("starting engine: %s", " ".join(cmd))
    relay = d.config.log_format == "json"
    # The engine logs to stderr, which is the daemon's log (relayed as JSON if asked).
    # Its own session gives it its own autogroup, whose weight we can set without
    # touching the shell the daemon was started from.
    d.engine = subprocess.Popen(
        cmd,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
        stderr=subprocess.PIPE if relay else None,
        pass_fds=(ctl_fd, theirs.fileno()),
    )
    theirs.close()
    engine = d.engine
    try:
        d.keeper.hand_over(ours)
    except OSError as e:  # it died at once: wait_ready says so
        log.warning("handing the engine what the last one left: %s", e)
    d.keep_reader = threading.Thread(target=_read_keep, args=(d, ours), name="engine-keep", daemon=True)
    d.keep_reader.start()
    if nice:
        try:
            netns.set_autogroup_nice(engine.pid, nice)
        except OSError as e:
            log.warning(
                "cannot set the engine's autogroup nice to %d (%s); it competes "
                "with tenant programs at equal weight",
                nice,
                e,
            )
    if relay and engine.stderr is not None:
        threading.Thread(
            target=engine_log_relay, args=(engine.stderr,), name="engine-log", daemon=True
        ).start()
    # Recorded so that `netkernel down` can stop an engine orphaned by a killed daemon.
    ENGINE_PID_FILE.write_text(f"{engine.pid}\n")
    wait_ready(ADMIN_SOCKET, lambda: engine.poll() is None)
    threading.Thread(target=_watch_engine, args=(d, engine), name="engine-watch", daemon=True).start()
    for nsm in d.nsms.values():
        register_nsm(d, nsm)
    d.engine_client.dns_upstream(str(d.config.bridge_ipv4), 53)
    log.info("engine ready (pid %d)", engine.pid)


def _read_keep(d: Daemon, sock: socket.socket) -> None:
    try:
        d.keeper.read(sock)
    finally:
        sock.close()


def restart_engine(d: Daemon, binary: Path | None = None) -> None:
    """A new engine in the dead one's place, with every NSM, tenant and policy again.
    Called with the Daemon's lock held."""
    d.engine_client.close()
    start_engine(d, binary)
    tenants = list(d.tenants.values())
    lines: list[str] = []
    for t in tenants:
        lines.append(tenant_add_line(t.name, str(netns.netns_path(t.netns)), t.nsm, t.ipv4, t.ipv6, t.region))
        lines.append(tenant_set_line(t.name, t.policy.engine_args()))
    # In one batch, with `serve` last: the data path waits on this (see EngineClient.pipeline).
    replies = d.engine_client.pipeline([*lines, "serve"])
    for i, t in enumerate(tenants):
        t.id = tenant_id(replies[2 * i])


def state_version(binary: Path) -> str:
    """What an engine binary must match to take sockets over (its kept records' layout)."""
    try:
        proc = subprocess.run([str(binary), "--state-version"], capture_output=True, text=True, timeout=10)
    except OSError as e:
        raise EngineError("state-version", "ENOEXEC", f"cannot run {binary}: {e}") from None
    if proc.returncode != 0 or not proc.stdout.strip():
        raise EngineError(
            "state-version", "ENOEXEC", f"{binary} does not say what socket state it keeps (--state-version)"
        )
    return proc.stdout.strip()


def upgrade_engine(d: Daemon, binary: Path | None = None) -> dict[str, object]:
    """Replace the running engine by `binary` (default: the installed one) without dropping a
    connection: the old engine hands every socket, control connection and counter to the
    daemon and ends; the new one takes them over. An incompatible binary is refused first,
    and nothing stops."""
    binary = Path(binary) if binary else engine_binary()
    with d.lock:
        old = d.engine
        if old is None or old.poll() is not None:
            raise EngineError("upgrade", "ESRCH", "no engine is running (see: netkernel status)")
        theirs = state_version(binary)
        ours = d.engine_client.request("state-version").value
        if theirs != ours:
            raise EngineError(
                "upgrade",
                "EPROTO",
                f"{binary} keeps socket state version {theirs}, the running engine {ours}: it "
                "cannot take the sockets over; nothing was changed (a restart would reset "
                "every connection: netkernel down; netkernel up)",
            )
        # Its exit is waited for on a pidfd, opened while it surely runs: Popen.wait(timeout)
        # polls with sleeps that double up to 50 ms, all of it data-path pause.
        exited = _exit_watch(old)
        started = time.monotonic()
        d.engine = None  # its exit is ours, not a crash
        d.keeper.handed_over.clear()
        try:
            sockets = int(d.engine_client.request("handover").value or 0)
        except Exception:
            d.engine = old
            exited(0)  # closes the pidfd
            raise
        if not exited(10):
            old.kill()
        old.wait()
        if d.keep_reader is not None:
            d.keep_reader.join(10)  # every record the old engine wrote is here
        handed = d.keeper.handed_over.is_set()
        try:
            restart_engine(d, binary)
        except Exception as e:
            d.engine_failed = f"the upgraded engine did not start: {e}"
            log_event("engine_upgrade_failed", logging.ERROR, error=str(e), binary=str(binary))
            _no_engine(d)
            raise
        pause = time.monotonic() - started
    log_event(
        "engine_upgraded",
        pid=d.engine.pid if d.engine else None,
        old_pid=old.pid,
        binary=str(binary),
        sockets=sockets,
        complete=handed,
        pause_ms=round(pause * 1000, 1),
    )
    return {
        "pid": d.engine.pid if d.engine else None,
        "old_pid": old.pid,
        "sockets": sockets,
        "pause_ms": round(pause * 1000, 1),
    }


def _exit_watch(proc: subprocess.Popen[bytes]) -> Callable[[float], bool]:
    """A function that waits up to its argument in seconds for ``proc`` to exit (True if it
    did), woken by the exit itself."""
    try:
        fd = os.pidfd_open(proc.pid)
    except OSError:
        return lambda timeout: _popen_exited(proc, timeout)

    def wait(timeout: float) -> bool:
        try:
            p = select.poll()
            p.register(fd, select.POLLIN)
            return bool(p.poll(timeout * 1000))
        finally:
            os.close(fd)

    return wait


def _popen_exited(proc: subprocess.Popen[bytes], timeout: float) -> bool:
    try:
        proc.wait(timeout)
        return True
    except subprocess.TimeoutExpired:
        return False


def _no_engine(d: Daemon) -> None:
    """No engine will come: processes waiting on the control socket get an error now
    (ENETDOWN from GuestLib), not a wait that never ends. The file stays (connections to it
    are refused): sandboxes bind-mount it, and `netkernel run` still starts programs."""
    if d.control_sock is not None:
        d.control_sock.close()
        d.control_sock = None


def _watch_engine(d: Daemon, engine: subprocess.Popen[bytes]) -> None:
    status = engine.wait()
    if d.stopping or d.engine is not engine:
        return
    now = time.monotonic()
    d.engine_crashes = [t for t in d.engine_crashes if now - t < CRASH_WINDOW] + [now]
    if len(d.engine_crashes) >= CRASH_LIMIT:
        d.engine_failed = (
            f"the engine died {len(d.engine_crashes)} times within {CRASH_WINDOW:.0f} s "
            f"(last exit status {status}); it is not restarted: tenants have no network. "
            "See the daemon's log, then restart NetKernel (netkernel down; netkernel up)"
        )
        log_event(
            "engine_given_up",
            logging.ERROR,
            status=status,
            deaths=len(d.engine_crashes),
            window_s=CRASH_WINDOW,
            action="not restarting it",
        )
        _no_engine(d)
        return
    log_event("engine_exited", logging.ERROR, status=status, pid=engine.pid, action="restarting it")
    with d.lock:
        if d.stopping:
            return
        try:
            restart_engine(d)
        except Exception as e:  # noqa: BLE001 - whatever failed, the daemon says so and stays
            d.engine_failed = f"restarting the engine failed: {e}"
            log_event("engine_restart_failed", logging.ERROR, error=str(e))
            if d.engine is not None and d.engine.poll() is None:
                d.engine.kill()
            _no_engine(d)
            return
    d.engine_restarts += 1
    regions, listeners = d.keeper.counts()
    log_event(
        "engine_restarted",
        pid=d.engine.pid if d.engine else None,
        seconds=round(time.monotonic() - now, 3),
        tenants=len(d.tenants),
        listeners_kept=listeners,
        restarts=d.engine_restarts,
    )


def stop_engine(d: Daemon) -> None:
    if d.engine and d.engine.poll() is None:
        d.engine.terminate()
        try:
            d.engine.wait(5)
        except subprocess.TimeoutExpired:
            log.warning("engine ignored SIGTERM; killing it")
            d.engine.kill()
            d.engine.wait()
