"""The control API's operations (docs/api.md), each a call into the Daemon; api.py has
checked a request's version, op and fields before it gets here."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import move, supervise, views
from .api import Handler
from .config import Policy, policy_with
from .errors import DaemonError, TenantError

if TYPE_CHECKING:
    from .daemon import Daemon


def api_handlers(d: Daemon) -> dict[str, Handler]:
    def policy_changes(req: dict[str, Any]) -> dict[str, object]:
        return {k: req[k] for k in Policy.__dataclass_fields__ if k in req}

    def tenant_create(req: dict[str, Any]) -> dict[str, Any]:
        changes = policy_changes(req)
        try:
            policy = policy_with(d.config.defaults, changes) if changes else None
        except ValueError as e:
            raise TenantError(str(e)) from None
        kind = req.get("kind", "namespace")
        if kind not in ("namespace", "vm"):
            raise TenantError(f"tenant-create: kind {kind!r}: give 'namespace' or 'vm'")
        t, created = d.create_tenant(req["name"], req.get("nsm"), policy, kind=kind)
        return {"tenant": t.record(), "created": created}

    def tenant_set(req: dict[str, Any]) -> dict[str, Any]:
        changes = policy_changes(req)
        if not changes:
            raise DaemonError(
                "tenant-set: nothing to change; give one or more of " + ", ".join(Policy.__dataclass_fields__)
            )
        return {"tenant": d.set_policy(req["name"], changes).record()}

    def tenant_move(req: dict[str, Any]) -> dict[str, Any]:
        t, pinned, warning = move.move_tenant(d, req["name"], req["nsm"])
        return {"tenant": t.record(), "moved": pinned is not None, "pinned_flows": pinned, "warning": warning}

    def tenant_delete(req: dict[str, Any]) -> dict[str, Any]:
        d.delete_tenant(req["name"])
        return {}

    def nsm_add(req: dict[str, Any]) -> dict[str, Any]:
        d.add_nsm(
            req["name"],
            req.get("congestion_control"),
            req.get("bandwidth"),
            req.get("sysctl", {}),
            req.get("kind", "kernel"),
        )
        return {"nsm": next(n for n in views.nsm_list(d) if n["name"] == req["name"])}

    def nsm_remove(req: dict[str, Any]) -> dict[str, Any]:
        d.remove_nsm(req["name"])
        return {}

    def upgrade(req: dict[str, Any]) -> dict[str, Any]:
        binary = req.get("engine")
        return supervise.upgrade_engine(d, Path(binary) if binary else None)

    def shutdown(req: dict[str, Any]) -> dict[str, Any]:
        d.stop_event.set()
        return {"pid": os.getpid()}

    return {
        "status": lambda req: views.status(d),
        "ps": lambda req: {"tenants": views.ps(d)},
        "conns": lambda req: {"conns": views.conns(d, req.get("tenant"))},
        "tenant-create": tenant_create,
        "tenant-delete": tenant_delete,
        "tenant-set": tenant_set,
        "tenant-move": tenant_move,
        "nsm-list": lambda req: {"nsms": views.nsm_list(d)},
        "nsm-add": nsm_add,
        "nsm-remove": nsm_remove,
        "upgrade": upgrade,
        "shutdown": shutdown,
    }
