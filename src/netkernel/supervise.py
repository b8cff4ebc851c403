"""The daemon's child processes: the engine, and the stack of each external NSM (lwIP). Each
is started, waited for until it is ready, watched and stopped here.

A dead NSM process is restarted; a dead engine stops the daemon. The functions take the
Daemon whose processes they are. start_engine and
register_nsm run at start-up and, for register_nsm, within add_nsm with the Daemon's lock
held; the NSM watcher thread takes that lock itself before it starts a new process, so that
it cannot race an NSM's removal.
"""

from __future__ import annotations

import logging
import os
import resource
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from . import netns
from .config import ADMIN_SOCKET, ENGINE_PID_FILE, ENGINE_SOCKET, engine_binary, format_rate, lwip_binary
from .daemon_log import engine_log_relay, log, log_event
from .engine import wait_ready
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
    # Its log goes where the daemon's goes; its own session keeps terminal signals away.
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, start_new_session=True)
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


def start_engine(d: Daemon) -> None:
    binary = engine_binary()
    d.fd_limit = raise_fd_limit()
    log.info("host limits allow %s", d.fd_limit.describe())
    for path in (ENGINE_SOCKET, ADMIN_SOCKET):
        path.unlink(missing_ok=True)
    cmd = [str(binary), "--control", str(ENGINE_SOCKET), "--admin", str(ADMIN_SOCKET)]
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
        cmd, stdin=subprocess.DEVNULL, start_new_session=True, stderr=subprocess.PIPE if relay else None
    )
    engine = d.engine
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
    if ENGINE_SOCKET.exists():
        # Tenant processes that dropped root (nginx workers) must still reach the engine;
        # it tells tenants apart by network namespace, not by file permissions.
        os.chmod(ENGINE_SOCKET, 0o666)
    threading.Thread(target=_watch_engine, args=(d,), name="engine-watch", daemon=True).start()
    for nsm in d.nsms.values():
        register_nsm(d, nsm)
    d.engine_client.dns_upstream(str(d.config.bridge_ipv4), 53)
    log.info("engine ready (pid %d)", engine.pid)


def _watch_engine(d: Daemon) -> None:
    assert d.engine is not None
    status = d.engine.wait()
    if not d.stopping:
        log_event("engine_exited", logging.ERROR, status=status, action="stopping the daemon")
        d.exit_code = 1
        d.stop_event.set()


def stop_engine(d: Daemon) -> None:
    if d.engine and d.engine.poll() is None:
        d.engine.terminate()
        try:
            d.engine.wait(5)
        except subprocess.TimeoutExpired:
            log.warning("engine ignored SIGTERM; killing it")
            d.engine.kill()
            d.engine.wait()
