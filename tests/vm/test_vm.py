"""VM tenants: a QEMU guest (TCG) with no NIC, run in its tenant's sandbox; commands run in it
with `netkernel vm exec`, their bytes, output and exit status carried by the exec port."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Daemon, nk, requires_root

pytestmark = [
    requires_root,
    pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="qemu-system-x86 is not installed"),
]


def vm_list() -> list[dict]:
    r = nk("vm", "list", "--json", check=True)
    return json.loads(r.stdout)


@pytest.fixture(scope="module")
def vm(nk_daemon: Daemon) -> Iterator[str]:
    name = "vmt1"
    r = nk("vm", "start", name, "--memory", "384M", timeout=200)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "no NIC" in r.stdout
    yield name
    nk("vm", "stop", name, timeout=60)
    nk("tenant", "delete", name)


def vexec(name: str, *cmd: str, **kw) -> subprocess.CompletedProcess[str]:
    return nk("vm", "exec", name, "--", *cmd, **kw)


def test_the_guest_has_no_network_device(vm: str) -> None:
    r = vexec(vm, "sh", "-c", "ls /sys/class/net; ls /sys/bus/pci/devices | wc -l")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[0] == "lo" and len(r.stdout.split()) == 2, r.stdout
    # No PCI device of the network class (0x02xxxx): no virtio-net, no e1000.
    r = vexec(vm, "sh", "-c", "cat /sys/bus/pci/devices/*/class")
    assert not [c for c in r.stdout.split() if c.startswith("0x02")], r.stdout


def test_exec_returns_status_output_and_stdin_bytes_exactly(vm: str) -> None:
    r = vexec(vm, "sh", "-c", "echo out; echo err >&2; exit 7")
    assert (r.returncode, r.stdout, r.stderr) == (7, "out\n", "err\n")
    assert vexec(vm, "no-such-program").returncode == 127
    assert vexec(vm, "sh", "-c", "kill -TERM $$").returncode == 128 + signal.SIGTERM
    data = os.urandom(3 << 20)
    p = subprocess.run(
        ["netkernel", "vm", "exec", vm, "--", "cat"], input=data, capture_output=True, timeout=120
    )
    assert p.returncode == 0, p.stderr
    assert hashlib.sha256(p.stdout).hexdigest() == hashlib.sha256(data).hexdigest()
    r = nk("vm", "exec", vm, "--cwd", "/usr", "--env", "GREETING=hi", "--", "sh", "-c", "pwd; echo $GREETING")
    assert r.stdout == "/usr\nhi\n", r.stdout + r.stderr


def test_commands_run_at_once_each_with_its_own_output(vm: str) -> None:
    procs = [
        subprocess.Popen(
            ["netkernel", "vm", "exec", vm, "--", "sh", "-c", f"sleep 1; echo {i}; exit {i}"],
            stdout=subprocess.PIPE,
            text=True,
        )
        for i in range(6)
    ]
    for i, p in enumerate(procs):
        out, _ = p.communicate(timeout=120)
        assert (p.returncode, out) == (i, f"{i}\n")


def test_the_guest_sees_the_tenants_files_read_only_with_a_private_overlay(vm: str, nk_tmpdir: Path) -> None:
    # QEMU runs as the tenant's user: the guest's root reads no more than a tenant can.
    r = vexec(vm, "cat", "/etc/shadow")
    assert r.returncode != 0 and "Permission denied" in r.stderr, r.stdout
    # Writes land in the guest's own overlay, never on the host.
    marker = nk_tmpdir / "host-file"
    marker.write_text("host\n")
    os.chmod(marker, 0o644)
    r = vexec(vm, "sh", "-c", f"cat {marker} && echo guest > {marker} && cat {marker} && touch /etc/nk-guest")
    assert r.returncode == 0 and r.stdout == "host\nguest\n", r.stdout + r.stderr
    assert marker.read_text() == "host\n"
    assert not Path("/etc/nk-guest").exists()


def test_the_vm_is_a_tenant(vm: str) -> None:
    ps = json.loads(nk("ps", "--json", check=True).stdout)
    row = next(t for t in (ps["tenants"] if isinstance(ps, dict) else ps) if t["name"] == vm)
    assert row["pids"], row  # QEMU, in the tenant's sandbox
    (v,) = [x for x in vm_list() if x["name"] == vm]
    qemu = int(v["qemu"])
    st = os.stat(f"/proc/{qemu}")
    assert st.st_uid >= 1_000_000_000, "QEMU runs as the tenant's user, not root"
    assert os.readlink(f"/proc/{qemu}/ns/net") != os.readlink("/proc/self/ns/net")


def test_kill_9_of_qemu_ends_the_vm_and_only_it(nk_daemon: Daemon, vm: str) -> None:
    name = "vmt2"
    r = nk("vm", "start", name, "--memory", "256M", timeout=200)
    assert r.returncode == 0, r.stderr
    running = subprocess.Popen(
        ["netkernel", "vm", "exec", name, "--", "sleep", "60"], stderr=subprocess.PIPE, text=True
    )
    time.sleep(1)
    pids = subprocess.run(
        ["pgrep", "-f", "qemu-system.*nkname=" + name], capture_output=True, text=True
    ).stdout
    assert pids.split(), "no QEMU for " + name
    for pid in pids.split():
        os.kill(int(pid), signal.SIGKILL)
    _, err = running.communicate(timeout=30)
    assert running.returncode == 255 and "went away" in err, err
    deadline = time.monotonic() + 10
    while any(x["name"] == name for x in vm_list()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(x["name"] == name for x in vm_list())
    # The other VM carries on, and this one starts again.
    assert vexec(vm, "true").returncode == 0
    r = nk("vm", "start", name, "--memory", "256M", timeout=200)
    assert r.returncode == 0, r.stderr
    assert vexec(name, "true").returncode == 0
    assert nk("vm", "stop", name, timeout=60).returncode == 0
    assert not any(x["name"] == name for x in vm_list())
    nk("tenant", "delete", name)


def test_vm_mistakes_say_what_to_do(nk_daemon: Daemon, vm: str) -> None:
    r = nk("vm", "start", "Bad/Name")
    assert r.returncode != 0 and "bad VM name" in r.stderr
    r = nk("vm", "start", "vmt3", "--memory", "lots")
    assert r.returncode != 0 and "512M" in r.stderr
    r = nk("vm", "start", "vmt3", "--memory", "64M")
    assert r.returncode != 0 and "at least 128M" in r.stderr
    r = nk("vm", "start", vm)
    assert r.returncode != 0 and "already running" in r.stderr
    r = nk("vm", "exec", "nosuchvm", "--", "true")
    assert r.returncode != 0 and "vm list" in r.stderr
    r = nk("vm", "exec", vm)
    assert r.returncode != 0 and "missing command" in r.stderr
    r = nk("vm", "exec", vm, "--env", "NOEQUALS", "--", "true")
    assert r.returncode != 0 and "KEY=VALUE" in r.stderr
    r = nk("vm", "start", "vmt3", "--accel", "kvm")
    if r.returncode != 0:  # no hardware KVM here: said so, and nothing started
        assert "--accel kvm" in r.stderr and "tcg" in r.stderr, r.stderr
    else:
        nk("vm", "stop", "vmt3", timeout=60)
    nk("tenant", "delete", "vmt3")
    assert not any(x["name"] == "vmt3" for x in vm_list())
