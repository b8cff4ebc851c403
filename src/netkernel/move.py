"""Moving a tenant to another NSM: new connections go to the new NSM, open ones stay in the
old one (steer pins them there) until they close; a drain check then removes the tenant's
addresses from the old NSM.

move_tenant and drain_once take the Daemon's lock themselves for all they do, as its own
changes to NSMs and tenants do: a move cannot meet a removal of either NSM, or a drain check
of the same tenant, half-way.
"""

from __future__ import annotations

import ipaddress
import logging
import subprocess
import time
from typing import TYPE_CHECKING, Any

from . import fabric, netns, steer
from .config import BRIDGE
from .daemon_log import log, log_event
from .engine import EngineClient
from .errors import EngineError, NetKernelError, TenantError
from .records import NSM, Tenant

if TYPE_CHECKING:
    from .daemon import Daemon

DRAIN_INTERVAL = 2.0  # how often moved tenants' old NSMs are checked for remaining flows
# Between the two steer.begin_move calls of a move: a connect() the engine issued just
# before tenant-move may still be completing its handshake in the old NSM; the second call
# pins it there too.
MOVE_SETTLE = 0.2


def _split_hostport(text: str) -> tuple[steer.IPAddress, int]:
    """The engine's "a.b.c.d:port" / "[v6]:port" (ValueError otherwise)."""
    host, _, port = text.rpartition(":")
    address = ipaddress.ip_address(host.strip("[]"))
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address, int(port)


def move_tenant(d: Daemon, name: str, nsm_name: str) -> tuple[Tenant, int | None, str | None]:
    """Move a tenant to another NSM: new connections go there, open ones stay where they
    are until they close. Returns the tenant, the number of flows pinned to the old NSM
    (None if the tenant was already on ``nsm_name``) and the engine's warning if some of
    the tenant's listeners could not follow."""
    with d.lock:
        t = d.get_tenant(name)
        new = d.get_nsm(nsm_name)
        if t.nsm == new.name:
            return t, None, None
        old = d.get_nsm(t.nsm)
        # Moving back to an NSM it is still draining from: its addresses are still there.
        present = set(netns.addr_list("eth0", netns=new.netns))
        added = not set(t.cidrs) <= present
        warning = None
        try:
            # Steer first: pin the flows that live in the old NSM and point new traffic at
            # the new one before it holds the addresses. Adding them first would let a
            # peer that re-resolves the address meanwhile send an old connection's
            # packets to the new NSM, which answers them with a reset.
            t.steered = True
            steer.begin_move(
                BRIDGE, t.ipv4, t.ipv6, old.netns, new.netns, **_steer_args(d.engine_client, t, old, new)
            )
            if added:
                fabric.add_tenant_addresses(t, new)
            try:
                d.engine_client.tenant_move(name, new.name)
            except EngineError as e:
                if e.errno_name in ("ENOENT", "EINVAL"):
                    raise TenantError(f"the engine refused: {e.engine_message}") from None
                # The engine did move the tenant, but some listener could not be opened in
                # the new NSM: finish the move (the engine is already there) and say so.
                warning = e.engine_message
            # Connections the old NSM accepted or opened meanwhile get pinned too.
            time.sleep(MOVE_SETTLE)
            pinned = steer.begin_move(
                BRIDGE, t.ipv4, t.ipv6, old.netns, new.netns, **_steer_args(d.engine_client, t, old, new)
            )
            d.engine_client.tenant_move_done(name)
        except BaseException as e:
            _undo_move(d.engine_client, t, old, new, added)
            if isinstance(e, NetKernelError | OSError | subprocess.SubprocessError):
                raise TenantError(
                    f"moving tenant {name!r} to {new.name!r} failed and was undone: {e}"
                ) from None
            raise
        t.nsm = new.name
        if new.name in t.draining:
            t.draining.remove(new.name)
        if old.name not in t.draining:
            t.draining.append(old.name)
        log_event(
            "tenant_moved",
            logging.WARNING if warning else logging.INFO,
            tenant=name,
            nsm=new.name,
            from_nsm=old.name,
            pinned_flows=pinned,
            warning=warning,
        )
        return t, pinned, warning


def _undo_move(client: EngineClient, t: Tenant, old: NSM, new: NSM, added: bool) -> None:
    """Best effort back to before a failed move: the engine and the steering on ``old``."""
    for undo, what in (
        (lambda: client.tenant_move(t.name, old.name), "engine tenant-move back"),
        (lambda: client.tenant_move_done(t.name), "engine tenant-move-done"),
        (
            lambda: steer.begin_move(
                BRIDGE, t.ipv4, t.ipv6, new.netns, old.netns, **_steer_args(client, t, new, old)
            ),
            "steering back",
        ),
    ):
        try:
            undo()
        except Exception as e:
            log.error("tenant %s: undoing a failed move: %s failed: %s", t.name, what, e)
    if added:
        fabric.remove_tenant_addresses(t, new)


def lwip_mac(nsm: NSM, t: Tenant) -> str:
    """The MAC of the tenant's netif in an lwIP NSM (csrc/nsm/lwip: 02:4e:4b:NSM:TENANT)."""
    return f"02:4e:4b:{(nsm.index + 1) & 0xFF:02x}:{(t.id >> 8) & 0xFF:02x}:{t.id & 0xFF:02x}"


def _engine_flows(
    client: EngineClient, t: Tenant, nsm: NSM, addresses: set[steer.IPAddress]
) -> set[steer.Flow]:
    """The tenant's TCP connections on an external NSM, as the engine sees them."""
    flows: set[steer.Flow] = set()
    for c in client.conns(t.name):
        if c.nsm != nsm.name or c.proto != "tcp" or c.kind != "stream" or not c.local or not c.peer:
            continue
        try:
            local, lport = _split_hostport(c.local)
            remote, rport = _split_hostport(c.peer)
        except ValueError:
            continue
        if local in addresses and rport:
            flows.add(steer.Flow(6, remote, rport, local, lport))
    return flows


def _steer_args(client: EngineClient, t: Tenant, old: NSM, new: NSM | None) -> dict[str, Any]:
    """What steer needs to know about lwIP NSMs on either side of a move."""
    args: dict[str, Any] = {}
    if old.external:
        args["old_mac"] = lwip_mac(old, t)
        args["old_flows"] = lambda addresses: _engine_flows(client, t, old, addresses)
    if new is not None and new.external:
        args["new_mac"] = lwip_mac(new, t)
    return args


def drain_once(d: Daemon) -> None:
    """Finish moves whose old NSM carries no connection of the tenant any more."""
    with d.lock:
        for t in list(d.tenants.values()):
            for old in list(t.draining):
                nsm = d.nsms.get(old)
                if nsm is None:
                    t.draining.remove(old)
                    continue
                args = _steer_args(d.engine_client, t, nsm, None)
                if steer.finish_if_drained(BRIDGE, t.ipv4, t.ipv6, nsm.netns, **args):
                    fabric.remove_tenant_addresses(t, nsm)
                    t.draining.remove(old)
                    log_event("tenant_drained", tenant=t.name, nsm=old)


def drain_loop(d: Daemon) -> None:
    while not d.stop_event.wait(DRAIN_INTERVAL):
        try:
            drain_once(d)
        except Exception:  # try again next round; the log says why
            log.exception("checking moved tenants' old NSMs failed")
