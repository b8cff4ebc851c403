"""What the daemon records of each NSM and each tenant it runs."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from . import netns, sandbox
from .config import (
    ENGINE_SOCKET,
    NSM_NETNS_PREFIX,
    RUN_DIR,
    TENANT_NETNS_PREFIX,
    TENANTS_DIR,
    NSMConfig,
    Policy,
)


@dataclass
class NSM:
    config: NSMConfig
    index: int  # its addresses are host 2+index of each subnet

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def netns(self) -> str:
        return NSM_NETNS_PREFIX + self.config.name

    @property
    def external(self) -> bool:
        """A stack in a process of its own, which the engine drives over ServiceLib."""
        return self.config.kind == "lwip"

    @property
    def socket(self) -> Path:
        """Where an external NSM's process connects to the engine."""
        return RUN_DIR / f"nsm-{self.config.name}.sock"


# A VM tenant's region: 4,096 sockets with 128 KiB rings, 1 GiB (2 MiB of guest page tables).
VM_REGION = (4096, 128 * 1024)


@dataclass
class Tenant:
    name: str
    nsm: str
    index: int  # N in 198.18.1.N
    id: int  # the engine's tenant id
    ipv4: str
    ipv6: str
    policy: Policy = field(default_factory=Policy)
    # NSMs the tenant was moved away from whose old connections are still open.
    draining: list[str] = field(default_factory=list)
    steered: bool = False  # steer holds rules for its addresses (it was moved at least once)
    cgroups: dict[str, str] = field(default_factory=dict)  # controller -> its cgroup
    rw: tuple[Path, ...] = ()  # host paths the config lets it write
    ro: tuple[Path, ...] = ()
    uid_slot: int = 0  # which host uid range is its own (sandbox.uid_slot: by name, for good)
    kind: str = "namespace"  # or "vm": a QEMU guest (netkernel vm), with a region it can map

    @property
    def region(self) -> tuple[int, int] | None:
        """(slots, ring bytes) of its region when not the engine's default: a VM's guest maps
        the region as a PCI BAR, whose page tables the guest kernel builds whole at mmap (the
        default 256 GiB would take 512 MiB of them), so a VM gets a small one."""
        return VM_REGION if self.kind == "vm" else None

    @property
    def netns(self) -> str:
        return TENANT_NETNS_PREFIX + self.name

    @property
    def uid_base(self) -> int:
        """Its root's host uid: its uids 0..65535 are this and the 65535 after it."""
        return sandbox.uid_base(self.uid_slot)

    @property
    def fs(self) -> Path:
        """Its private tmpfs (/run, /var/tmp, /dev/shm inside)."""
        return TENANTS_DIR / self.name / "fs"

    @property
    def cidrs(self) -> tuple[str, str]:
        return f"{self.ipv4}/32", f"{self.ipv6}/128"

    def record(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "rw": [str(p) for p in self.rw],
            "ro": [str(p) for p in self.ro],
            "netns": self.netns,
            "netns_path": str(netns.netns_path(self.netns)),
            "resolv_conf": str(TENANTS_DIR / self.name / "resolv.conf"),
            "engine_socket": str(ENGINE_SOCKET),
            "uid_base": self.uid_base,
            "uid_count": sandbox.TENANT_UID_COUNT,
            "fs": str(self.fs),
        }
