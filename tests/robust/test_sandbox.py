"""A tenant is sandboxed (src/netkernel/sandbox.py): tried from inside, as a hostile program.

Its root is an unprivileged host uid; the host's files are read-only to it and its private
/run, /var/tmp and /dev/shm are its own; it sees only its own processes and cannot signal
the engine, the daemon or another tenant; no_new_privs and a seccomp filter hold; its
cgroup holds a fork bomb and a memory hog while a neighbour's checksummed transfer goes on.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from conftest import TENANT_PY, nk  # noqa: E402
from test_hostile import transfer  # noqa: E402

from netkernel.config import DAEMON_SOCKET, ENGINE_PID_FILE, PID_FILE  # noqa: E402

PY = TENANT_PY


def run_py(t: Any, code: str, *args: str, timeout: float = 60) -> str:
    r = t.run([PY, "-c", code, *args], capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"exit {r.returncode}: {r.stdout} {r.stderr}"
    return r.stdout.strip()


TRY = """import errno, os, socket, sys
def attempt(f):
    try:
        f()
        return "ok"
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e.errno))
"""


def test_tenant_root_is_an_unprivileged_host_uid(tenant: Any) -> None:
    t = tenant("uids")
    out = run_py(t, "import os; print(os.getuid(), open('/proc/self/uid_map').read().split())")
    assert out == f"0 ['0', '{t.uid_base}', '65536']", out
    # Seen from the host, the program runs as that uid.
    p = t.popen(["sleep", "10"])
    try:
        deadline = time.monotonic() + 10
        uids = []
        while time.monotonic() < deadline and not uids:
            for pid in Path("/proc").iterdir():
                if pid.name.isdigit():
                    try:
                        if (pid / "cmdline").read_bytes().split(b"\0")[:2] == [b"/usr/bin/sleep", b"10"]:
                            uids.append(int((pid / "status").read_text().split("Uid:")[1].split()[0]))
                    except OSError:
                        pass
            time.sleep(0.1)
        assert uids == [t.uid_base], uids
    finally:
        p.kill()
        p.wait()


def test_host_filesystem_is_read_only(tenant: Any) -> None:
    t = tenant("rofs")
    out = run_py(
        t,
        TRY
        + """
for path in ("/etc/cron.d/netkernel-test", "/proc/sys/kernel/core_pattern", "/usr/bin/x", "/tmp/x"):
    print(path, attempt(lambda: open(path, "w")))
print("/sys", attempt(lambda: open("/sys/kernel/mm/transparent_hugepage/enabled", "w")))
""",
    )
    lines = dict(line.rsplit(" ", 1) for line in out.splitlines())
    assert lines["/etc/cron.d/netkernel-test"] == "EROFS", out
    assert lines["/proc/sys/kernel/core_pattern"] in ("EROFS", "EACCES"), out
    assert lines["/usr/bin/x"] == "EROFS" and lines["/tmp/x"] == "EROFS", out
    assert lines["/sys"] in ("EROFS", "EACCES"), out
    assert not Path("/etc/cron.d/netkernel-test").exists()


def test_private_directories_are_the_tenants_own(tenant: Any) -> None:
    """/var/tmp, /run and /dev/shm are writable, last as long as the tenant (the next program
    of the same tenant sees them), and no other tenant or the host sees them."""
    a, b = tenant("priva"), tenant("privb")
    marker = f"netkernel-private-{os.getpid()}"
    for d in ("/var/tmp", "/run", "/dev/shm"):
        run_py(a, f"open('{d}/{marker}', 'w').write('mine')")
        assert run_py(a, f"print(open('{d}/{marker}').read())") == "mine"
        assert run_py(b, TRY + f"print(attempt(lambda: open('{d}/{marker}')))") == "ENOENT"
        assert not Path(d, marker).exists()
    # None of NetKernel's sockets but the engine's is in its /run (beside GuestLib and the
    # relay's log).
    listing = run_py(a, "import os; print(sorted(os.listdir('/run/netkernel')))")
    assert listing == "['engine.sock', 'lib', 'relay.log']", listing
    ask = f"print(attempt(lambda: socket.socket(socket.AF_UNIX).connect('{DAEMON_SOCKET}')))"
    assert run_py(a, TRY + ask) == "ENOENT"


def test_other_tenants_files_are_not_writable(tenant: Any, nk_tmpdir: Path) -> None:
    """A directory granted to one tenant is that tenant's: another, even given it read-only or
    reaching it as the host's read-only view, cannot write it."""
    a, b = tenant("ownera"), tenant("ownerb")
    a.grant(nk_tmpdir)
    run_py(a, f"open('{nk_tmpdir}/a.txt', 'w').write('from a')")
    assert (nk_tmpdir / "a.txt").read_text() == "from a"
    assert (nk_tmpdir / "a.txt").stat().st_uid == a.uid_base
    out = run_py(
        b,
        TRY
        + f"""
print(attempt(lambda: open('{nk_tmpdir}/a.txt', 'a')), attempt(lambda: open('{nk_tmpdir}/b.txt', 'w')))""",
    )
    assert out.split()[0] in ("EACCES", "EROFS") and out.split()[1] in ("EACCES", "EROFS"), out
    # Granting it to tenant b as well is refused: it is not b's to write.
    r = nk("run", "--tenant", b.name, "--rw", str(nk_tmpdir), "--", "true")
    assert r.returncode == 126 and "not writable by the tenant's root" in r.stderr, r.stderr


def test_host_uids_belong_to_the_tenant_name_for_good(tenant: Any, nk_tmpdir: Path) -> None:
    """A tenant's files in a directory granted to it stay its own: after it is deleted, a new
    tenant does not get its host uids (and with them its files); made again under its name,
    it has them back, and its grant still works."""
    a = tenant("uidkeep")
    a.grant(nk_tmpdir)
    run_py(a, f"open('{nk_tmpdir}/mine.txt', 'w').write('kept')")
    base = a.uid_base
    nk("tenant", "delete", a.name, check=True)
    b = tenant("uidnext")
    assert b.uid_base != base
    out = run_py(b, TRY + f"print(attempt(lambda: open('{nk_tmpdir}/mine.txt', 'a')))")
    assert out in ("EACCES", "EROFS"), out
    again = tenant("uidkeep")
    assert again.uid_base == base
    again.rw.append(nk_tmpdir)
    assert run_py(again, f"print(open('{nk_tmpdir}/mine.txt').read())") == "kept"


def test_uid_ranges_are_recorded_and_a_damaged_record_is_refused(tmp_path: Path) -> None:
    from netkernel import sandbox

    path = tmp_path / "uid-ranges.json"
    a, b = sandbox.uid_slot("a", path), sandbox.uid_slot("b", path)
    assert a != b and sandbox.uid_slot("a", path) == a
    assert sandbox.uid_base(sandbox.UID_SLOTS - 1) + sandbox.TENANT_UID_COUNT <= 2**32 - 1
    path.write_text("{not json")
    with pytest.raises(sandbox.SandboxError, match="unreadable"):
        sandbox.uid_slot("c", path)
    assert path.read_text() == "{not json"  # nothing lost


SIGNALS = (
    TRY
    + """
for pid in map(int, sys.argv[1:]):
    print(attempt(lambda: os.kill(pid, 0)))
"""
)


def test_signals_to_the_engine_daemon_and_other_tenants_fail(tenant: Any) -> None:
    a, b = tenant("siga"), tenant("sigb")
    victim = b.popen(["sleep", "30"])
    try:
        time.sleep(1)
        tenants = json.loads(nk("ps", "--json", check=True).stdout)["tenants"]
        others = next(x for x in tenants if x["name"] == b.name)["pids"]
        pids = [int(ENGINE_PID_FILE.read_text()), int(PID_FILE.read_text()), *others]
        out = run_py(a, SIGNALS, *map(str, pids)).split()
        assert out == ["ESRCH"] * len(pids), (pids, out)
        assert victim.poll() is None
    finally:
        victim.kill()
        victim.wait()


def test_no_new_privileges_and_seccomp(tenant: Any) -> None:
    t = tenant("seccomp")
    out = run_py(
        t,
        TRY
        + """
status = dict(line.split(":", 1) for line in open("/proc/self/status"))
print(status["NoNewPrivs"].strip(), status["Seccomp"].strip())
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
print("unshare_user", libc.unshare(0x10000000), ctypes.get_errno())
print("vsock", attempt(lambda: socket.socket(40, socket.SOCK_STREAM)))
print("mount", libc.mount(b"none", b"/var/tmp", b"tmpfs", 0, None), ctypes.get_errno())
""",
    )
    lines = out.splitlines()
    assert lines[0] == "1 2", out  # no_new_privs; a seccomp filter
    assert lines[1] == "unshare_user -1 1", out  # EPERM
    assert lines[2] == "vsock EAFNOSUPPORT", out
    assert lines[3] == "mount -1 1", out


def test_every_process_a_tenant_sees_is_as_confined_as_itself(tenant: Any) -> None:
    """The processes that hold the tenant's namespaces are in its pid namespace and run as its
    root, so its programs can look through them (/proc/PID/root) and ptrace them: they must
    show the tenant's own files and be under the same seccomp filter, or they are a way out
    (the host's /run and its sockets, unfiltered system calls injected by ptrace)."""
    t = tenant("holderview")
    out = run_py(
        t,
        """import os
for pid in sorted(int(p) for p in os.listdir("/proc") if p.isdigit()):
    try:
        run = sorted(os.listdir(f"/proc/{pid}/root/run"))
        status = dict(line.split(":", 1) for line in open(f"/proc/{pid}/status"))
    except OSError:
        continue
    print(pid, status["Seccomp"].strip(), status["NoNewPrivs"].strip(), ",".join(run))
""",
    )
    rows = [line.split(" ", 3) for line in out.splitlines()]
    # The holder's init and this program; the relay the holder keeps up has GuestLib in it,
    # which makes a process undumpable (nothing of the tenant can look through it at all).
    assert len(rows) >= 2, out
    for pid, seccomp, nnp, run in rows:
        assert (seccomp, nnp) == ("2", "1"), f"pid {pid} in the tenant runs unfiltered: {out}"
        assert run.split(",") == ["netkernel"], f"pid {pid} shows another /run: {out}"


def test_a_tenant_that_kills_its_namespaces_holder_hurts_only_itself(tenant: Any) -> None:
    """The holder is in the tenant's pid namespace, so its programs may kill it: that ends
    the namespace and SIGKILLs all of them. `netkernel run` says so (a program that dies of
    SIGKILL with no word is hard to chase), a neighbour's programs live on, and the tenant's
    next program gets a new holder."""
    t, other = tenant("holderkill"), tenant("holdernb")
    victim = t.popen(["sleep", "60"], stderr=subprocess.PIPE, text=True)
    neighbour = other.popen(["sleep", "60"])
    try:
        time.sleep(1)
        # The holder's init is pid 1; what it keeps up is its child, the relay.
        kill = "import os; os.kill(int(open('/proc/1/task/1/children').read().split()[0]), 9)"
        r = t.run([PY, "-c", kill], capture_output=True, text=True, timeout=60)
        assert r.returncode in (0, 137), r  # the killer itself may go down with the namespace
        _, err = victim.communicate(timeout=30)
        assert victim.returncode == 137, (victim.returncode, err)
        assert "sandbox, which ended" in err, err
        assert neighbour.poll() is None, "a neighbour's program died with another tenant's holder"
        assert run_py(t, "print('again')").strip() == "again"
    finally:
        for p in (victim, neighbour):
            p.kill()
            p.wait()


def test_processes_join_the_tenants_cgroup_beneath_the_daemons(tenant: Any) -> None:
    t = tenant("cgjoin")
    from netkernel import cgroups

    daemon_pid = int(PID_FILE.read_text())
    places = cgroups.discover(daemon_pid)
    assert places, "no cgroup controller on this host"
    p = t.popen(["sleep", "10"])
    try:
        time.sleep(1)
        pids = [
            x for x in json.loads(nk("ps", "--json", check=True).stdout)["tenants"] if x["name"] == t.name
        ][0]["pids"]
        for controller, place in places.items():
            want = place.path.rstrip("/") + f"/netkernel.{t.name}"
            for pid in pids:
                mine = cgroups.discover(pid)[controller].path
                assert mine == want, (controller, pid, mine, want)
    finally:
        p.kill()
        p.wait()


FORK_BOMB = """import os, time
end = time.monotonic() + float(__import__("sys").argv[1])
born = failed = 0
while time.monotonic() < end:
    try:
        if os.fork() == 0:
            time.sleep(30)
            os._exit(0)
        born += 1
    except OSError:
        failed += 1
        time.sleep(0.001)
print(born, failed, flush=True)
"""

HOG = """import sys
chunks = []
while True:
    chunks.append(bytearray(64 << 20))  # touched: bytearray zero-fills
    print(len(chunks) * 64, flush=True)
"""


@pytest.mark.parametrize("attack", ["fork_bomb", "memory_hog"])
def test_cgroup_holds_a_runaway_tenant(attack: str, tenant: Any, peer_ns: Any) -> None:
    """A fork bomb stops at the tenant's process limit, a memory hog is killed at its memory
    limit, and a neighbour's checksummed transfer completes meanwhile."""
    bad, good = tenant(f"run{attack[:4]}"), tenant(f"nb{attack[:4]}")
    nk("tenant", "set", bad.name, "--max-processes", "100", "--max-process-memory", "256MiB", check=True)
    peer = peer_ns()
    errors: list[BaseException] = []

    def neighbour() -> None:
        try:
            transfer(good, peer, 256, 7901)
        except BaseException as e:
            errors.append(e)

    th = threading.Thread(target=neighbour)
    if attack == "fork_bomb":
        p = bad.popen([PY, "-c", FORK_BOMB, "6"], stdout=subprocess.PIPE, text=True)
        th.start()
        out, _ = p.communicate(timeout=120)
        born, failed = map(int, out.split())
        assert born <= 100 and failed > 0, out
    else:
        p = bad.popen([PY, "-c", HOG], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        th.start()
        out, err = p.communicate(timeout=120)
        got = [int(x) for x in out.split()]
        assert p.returncode in (137, -9), (p.returncode, got[-3:])  # the OOM killer's SIGKILL
        assert got and got[-1] <= 256, got[-3:]
        # `netkernel run` says who killed it, and which limit to raise.
        assert "OOM killer" in err and "max-process-memory" in err, err
    th.join(timeout=180)
    assert not th.is_alive() and not errors, errors
    nk("tenant", "delete", bad.name, check=True)  # its processes (the bomb's children) go too


def test_a_grant_through_a_link_the_tenant_made_is_refused(tenant: Any, nk_tmpdir: Path) -> None:
    """A grant inside another is the tenant's to replace: made a symbolic link to a directory
    anyone may write (the host's /tmp, say), it would be bound read-write where it leads."""
    open_dir = Path(tempfile.mkdtemp(prefix="netkernel-open-"))
    try:
        open_dir.chmod(0o1777)
        t = tenant("grantlink")
        (nk_tmpdir / "uploads").mkdir()
        t.grant(nk_tmpdir)
        run_py(
            t, f"import os; os.rmdir('{nk_tmpdir}/uploads'); os.symlink('{open_dir}', '{nk_tmpdir}/uploads')"
        )
        r = nk(
            "run",
            "--tenant",
            t.name,
            "--rw",
            str(nk_tmpdir / "uploads"),
            "--",
            "touch",
            str(nk_tmpdir / "uploads" / "planted"),
        )
        assert r.returncode == 126 and "symbolic link" in r.stderr, (r.returncode, r.stderr)
        assert not (open_dir / "planted").exists()
        # A link the operator made (in a directory the tenant cannot write) is followed.
        mine = Path(tempfile.mkdtemp(prefix="netkernel-link-"))
        try:
            mine.chmod(0o755)
            (mine / "data").symlink_to(nk_tmpdir)
            r = nk(
                "run",
                "--tenant",
                t.name,
                "--rw",
                str(mine / "data"),
                "--",
                "touch",
                str(mine / "data" / "ok"),
            )
            assert r.returncode == 0, r.stderr
            assert (nk_tmpdir / "ok").exists()
        finally:
            shutil.rmtree(mine)
    finally:
        shutil.rmtree(open_dir)


def test_grants_are_checked_with_a_clear_error(tenant: Any, nk_tmpdir: Path) -> None:
    t = tenant("grants")
    r = nk("run", "--tenant", t.name, "--rw", str(nk_tmpdir), "--", "true")
    assert r.returncode == 126 and f"chown -R {t.uid_base}:{t.uid_base} {nk_tmpdir}" in r.stderr, r.stderr
    r = nk("run", "--tenant", t.name, "--rw", "/nonexistent-netkernel", "--", "true")
    assert r.returncode == 126 and "/nonexistent-netkernel" in r.stderr, r.stderr
    # A program only root may reach (under /root, as pyenv installs Python) is named as such.
    hidden = Path("/root")
    if hidden.stat().st_mode & 0o001 == 0:
        r = nk("run", "--tenant", t.name, "--", sys.executable, "-c", "pass")
        assert r.returncode == 126 and "/root" in r.stderr and "cannot run it" in r.stderr, r.stderr
