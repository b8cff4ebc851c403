"""Control groups for tenants: memory, process count and CPU weight from the tenant's policy.

Each tenant's cgroup is made beneath the cgroup the daemon itself runs in, in every hierarchy
that has one of the controllers (``<daemon's cgroup>/netkernel.<tenant>``), as a systemd
service with ``Delegate=yes`` would: the daemon never moves a process out of the part of the
tree it was given, only tenant processes into their own cgroups below it. They sit directly
there, not under a common parent: the scheduler shares CPU level by level, so a parent would
weigh as one process against the engine whatever the number of tenants (16 tenants' programs
held to one process's share), and it hands a sleeping tenant's share to its busy siblings (a
tenant given the least weight takes the whole parent's while its neighbours wait on the
network). Flat, each tenant weighs its own weight against the engine and the host. Hosts mount the
controllers as cgroup v1 hierarchies (one per controller, as on these machines), or v2's
unified tree (one path, the controllers enabled in the parents' ``cgroup.subtree_control``);
both are handled, a mix too (each controller where it is mounted).

Limits: ``max_process_memory`` is the memory the tenant's processes may use (anonymous
memory, page cache and their tmpfs pages; swap not beyond it), ``max_processes`` the tasks
(a fork bomb stops there), and the policy's ``weight`` is its CPU weight against other
tenants (1024 shares or 100 v2 weight per unit).
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from . import pids
from .errors import NetKernelError

log = logging.getLogger(__name__)

CONTROLLERS = ("memory", "pids", "cpu")
PREFIX = "netkernel."  # a tenant's cgroup is the daemon's cgroup's child PREFIX + its name


class CgroupError(NetKernelError):
    """A tenant's cgroup could not be made, limited or joined."""


@dataclass(frozen=True)
class Place:
    """Where the daemon sits for one controller: the hierarchy's mount point and its path
    there; v2 when the controller lives in the unified tree."""

    controller: str
    mount: Path
    path: str
    v2: bool

    @property
    def base(self) -> Path:
        """The daemon's own cgroup in this hierarchy."""
        return self.mount / self.path.lstrip("/")

    def tenant_dir(self, tenant: str) -> Path:
        return self.base / (PREFIX + tenant)


def _mounts() -> list[tuple[str, Path, set[str]]]:
    """(fstype, mount point, super options) of every cgroup mount, from mountinfo."""
    out = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        fields = left.split()
        rest = right.split()
        if len(fields) < 5 or len(rest) < 3 or rest[0] not in ("cgroup", "cgroup2"):
            continue
        out.append((rest[0], Path(fields[4]), set(rest[2].split(","))))
    return out


def discover(pid: int | str = "self") -> dict[str, Place]:
    """Where process ``pid`` (the daemon) sits for each controller it can use."""
    v1: dict[str, str] = {}
    v2_path: str | None = None
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        hid, names, path = line.split(":", 2)
        if hid == "0" and names == "":
            v2_path = path
        for name in names.split(","):
            v1[name] = path
    places: dict[str, Place] = {}
    mounts = _mounts()
    for controller in CONTROLLERS:
        if controller in v1:
            for fstype, mount, opts in mounts:
                if fstype == "cgroup" and controller in opts:
                    places[controller] = Place(controller, mount, v1[controller], False)
                    break
    for fstype, mount, _ in mounts:
        if fstype != "cgroup2" or v2_path is None:
            continue
        try:
            available = (mount / "cgroup.controllers").read_text().split()
        except OSError:
            continue
        for controller in CONTROLLERS:
            if controller not in places and controller in available:
                places[controller] = Place(controller, mount, v2_path, True)
        break
    return places


def _write(path: Path, value: str) -> None:
    try:
        path.write_text(value)
    except OSError as e:
        raise CgroupError(f"cannot write {value.strip()!r} to {path}: {e.strerror}") from None


def _enable_v2(place: Place) -> None:
    """Turn the controller on for the children of the daemon's cgroup."""
    control = place.base / "cgroup.subtree_control"
    if place.controller not in control.read_text().split():
        try:
            control.write_text(f"+{place.controller}")
        except OSError as e:
            raise CgroupError(
                f"cannot enable the {place.controller} controller below {place.base} ({e.strerror}); "
                "on cgroup v2 the daemon's own cgroup must have no processes besides its "
                "children's cgroups (systemd: Delegate=yes and a sub-cgroup for the daemon)"
            ) from None


class Cgroups:
    """The tenants' cgroups of one daemon."""

    def __init__(self, places: dict[str, Place] | None = None) -> None:
        self.places = discover() if places is None else places

    def missing(self) -> list[str]:
        return [c for c in CONTROLLERS if c not in self.places]

    def paths(self, tenant: str) -> dict[str, str]:
        """controller -> the tenant's cgroup directory."""
        return {c: str(p.tenant_dir(tenant)) for c, p in self.places.items()}

    def create(self, tenant: str, memory: int, processes: int, weight: int) -> dict[str, str]:
        for place in self.places.values():
            if place.v2:
                _enable_v2(place)
            place.tenant_dir(tenant).mkdir(exist_ok=True)
        try:
            self.limit(tenant, memory, processes, weight)
        except BaseException:
            self.remove(tenant)
            raise
        return self.paths(tenant)

    def limit(self, tenant: str, memory: int, processes: int, weight: int) -> None:
        for c, place in self.places.items():
            d = place.tenant_dir(tenant)
            if c == "memory":
                if place.v2:
                    _write(d / "memory.max", str(memory) if memory else "max")
                    if (d / "memory.swap.max").exists():
                        _write(d / "memory.swap.max", "0")
                else:
                    limit = str(memory) if memory else "-1"
                    swap = d / "memory.memsw.limit_in_bytes"
                    # memsw >= memory at all times: raise the larger one first.
                    order = [d / "memory.limit_in_bytes", swap]
                    if swap.exists() and memory and _read_int(swap) < memory:
                        order.reverse()
                    for f in order:
                        if f.exists():
                            _write(f, limit)
            elif c == "pids":
                _write(d / "pids.max", str(processes) if processes else "max")
            elif c == "cpu":
                if place.v2:
                    _write(d / "cpu.weight", str(min(10000, 100 * weight)))
                else:
                    _write(d / "cpu.shares", str(min(262144, 1024 * weight)))

    def pids(self, tenant: str) -> set[int]:
        found: set[int] = set()
        for place in self.places.values():
            try:
                found |= {int(x) for x in (place.tenant_dir(tenant) / "cgroup.procs").read_text().split()}
            except OSError:
                pass
        return found

    def kill(self, tenant: str) -> None:
        """SIGKILL every process in the tenant's cgroups (none can leave them: moving a process
        needs write access to the target's cgroup.procs, which a tenant has nowhere). v2's
        ``cgroup.kill`` does it in the kernel, atomically against forks; elsewhere each PID is
        signalled only if it is still in the cgroup once pinned (pids.py: numbers are reused)."""
        for place in self.places.values():
            if place.v2:
                try:
                    _write(place.tenant_dir(tenant) / "cgroup.kill", "1")
                except (OSError, CgroupError):
                    pass  # before Linux 5.14, or gone: the loop below
        for _ in range(10):
            found = self.pids(tenant)
            if not found:
                return
            for pid in found:
                pids.signal_if(pid, signal.SIGKILL, lambda p: p in self.pids(tenant))
            time.sleep(0.05)

    def remove(self, tenant: str, wait: float = 5.0) -> None:
        """Remove the tenant's cgroups (its processes must be gone; they may take a moment to
        leave after SIGKILL)."""
        for place in self.places.values():
            d = place.tenant_dir(tenant)
            deadline = time.monotonic() + wait
            while d.exists():
                try:
                    d.rmdir()
                except OSError as e:
                    if e.errno == errno.ENOENT:
                        break
                    if e.errno != errno.EBUSY or time.monotonic() > deadline:
                        log.warning("cannot remove cgroup %s: %s", d, e.strerror)
                        break
                    time.sleep(0.05)

    def remove_all(self) -> list[str]:
        """Every tenant cgroup beside the daemon's: leftovers of a crashed daemon."""
        removed = []
        for place in self.places.values():
            try:
                found = [d for d in place.base.iterdir() if d.name.startswith(PREFIX) and d.is_dir()]
            except OSError:
                continue
            for d in found:
                self.remove_dir(d)
                removed.append(str(d))
        return removed

    @staticmethod
    def remove_dir(d: Path) -> None:
        try:
            d.rmdir()
        except OSError as e:
            log.warning("cannot remove cgroup %s: %s", d, e.strerror)


def _read_int(path: Path) -> int:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return 0


def join(paths: dict[str, str], pid: int | None = None) -> None:
    """Move process ``pid`` (default: this one) into each of the cgroups in ``paths``."""
    me = str(pid if pid is not None else os.getpid())
    for c, d in paths.items():
        try:
            Path(d, "cgroup.procs").write_text(me)
        except OSError as e:
            raise CgroupError(
                f"cannot join the tenant's {c} cgroup {d}: {e.strerror} "
                "(is the daemon running? `netkernel status`)"
            ) from None


def oom_kills(paths: dict[str, str]) -> int | None:
    """How many of the cgroup's processes the kernel's OOM killer has killed (its memory
    limit reached), or None where the kernel does not count them."""
    d = paths.get("memory")
    if not d:
        return None
    for name in ("memory.events", "memory.oom_control"):  # v2, v1
        try:
            for line in Path(d, name).read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
        except (OSError, ValueError):
            continue
    return None
