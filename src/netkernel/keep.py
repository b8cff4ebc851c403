"""What the daemon keeps for the next engine: the kernel objects tenants hold that the engine
made, so that an engine that dies (or is replaced) does not take them along.

Each tenant's region memfd and doorbell eventfd, and the engine end of each listener's proxy
fd with the engine's record of it, come over a SOCK_SEQPACKET pair (the engine's ``--keep
FD``; csrc/engine/keep.c has the format). The daemon reads the text line that starts each
message for its key and keeps the rest as the engine wrote it; a new engine gets it all back
at start-up, before it answers on its admin socket. Descriptors are owned here until handed
over, and closed when the engine says a listener or tenant is gone, or the tenant is deleted.
"""

from __future__ import annotations

import os
import socket
import threading
from dataclasses import dataclass

from .daemon_log import log

MAX_MESSAGE = 32768  # records: a socket's about 5 KiB, an external NSM's about 8 (keep.c)
MAX_FDS = 10  # NK_FDPASS_MAX: a socket's proxy, direct and pending ends and six endpoints


@dataclass
class _Kept:
    message: bytes
    fds: list[int]

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []


class Keeper:
    """The kept objects, and the reader of one engine's channel at a time."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._regions: dict[str, _Kept] = {}
        self._listeners: dict[tuple[str, int, int], _Kept] = {}
        # A live upgrade's (supervise.upgrade_engine): every socket, control connection,
        # tenant's counters and external NSM's state of the engine that handed over, for the
        # next one only (an NSM's is keyed by its name where a tenant's is).
        self._handover: list[tuple[str, _Kept]] = []
        self.handed_over = threading.Event()

    # -- the engine's side ------------------------------------------------------------------
    def channel(self) -> tuple[socket.socket, socket.socket]:
        """A new pair: (ours, the engine's). The engine's end goes to its --keep."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        theirs.set_inheritable(True)
        return ours, theirs

    def hand_over(self, sock: socket.socket) -> None:
        """Send a starting engine what the last one left, then "end". The engine reads as we
        write (before its admin socket opens), so a full buffer only makes us wait."""
        with self._lock:
            items = [(k.message, list(k.fds)) for k in self._regions.values()]
            items += [(k.message, list(k.fds)) for _t, k in self._handover]
            items += [(k.message, list(k.fds)) for k in self._listeners.values()]
            handover, self._handover = self._handover, []
        try:
            for message, fds in items:
                socket.send_fds(sock, [message], fds)
            sock.sendall(b"end\n")
        finally:
            for _t, k in handover:  # the engine has its own copies now (or never will)
                k.close()

    def read(self, sock: socket.socket) -> None:
        """Until the engine's end closes: take what it keeps and forgets."""
        while True:
            try:
                data, fds, _flags, _addr = socket.recv_fds(sock, MAX_MESSAGE, MAX_FDS)
            except OSError:
                return
            if not data and not fds:
                return
            try:
                self._take(data, fds)
            except (ValueError, IndexError):
                log.warning("keep channel: a message the daemon cannot read: %r", data[:80])
                for fd in fds:
                    os.close(fd)

    def _take(self, data: bytes, fds: list[int]) -> None:
        head, _, _ = data.partition(b"\n")
        words = head.decode("ascii").split(" ")
        kind = words[0]
        if kind == "handed-over":
            self.handed_over.set()
            return
        tenant = words[1]
        with self._lock:
            if kind in ("sock", "ctl", "counters", "nsm"):
                self._handover.append((tenant, _Kept(data, fds)))
                return
            if kind == "region" and len(fds) == 2:
                old = self._regions.pop(tenant, None)
                self._regions[tenant] = _Kept(data, fds)
            elif kind == "listener" and len(fds) == 1:
                key = (tenant, int(words[2]), int(words[3]))
                old = self._listeners.pop(key, None)
                self._listeners[key] = _Kept(data, fds)
            elif kind == "drop" and not fds:
                old = self._listeners.pop((tenant, int(words[2]), int(words[3])), None)
            elif kind == "forget" and not fds:
                self._forget(tenant)
                return
            else:
                raise ValueError(kind)
        if old is not None:
            old.close()

    # -- the daemon's side ------------------------------------------------------------------
    def forget(self, tenant: str) -> None:
        """The tenant is gone: its region and listeners are nobody's any more."""
        with self._lock:
            self._forget(tenant)

    def _forget(self, tenant: str) -> None:
        region = self._regions.pop(tenant, None)
        if region is not None:
            region.close()
        for key in [k for k in self._listeners if k[0] == tenant]:
            self._listeners.pop(key).close()
        for _t, k in [h for h in self._handover if h[0] == tenant]:
            k.close()
        self._handover = [h for h in self._handover if h[0] != tenant]

    def counts(self) -> tuple[int, int]:
        with self._lock:
            return len(self._regions), len(self._listeners)

    def close(self) -> None:
        with self._lock:
            for k in [*self._regions.values(), *self._listeners.values(), *(h[1] for h in self._handover)]:
                k.close()
            self._regions.clear()
            self._listeners.clear()
            self._handover.clear()
