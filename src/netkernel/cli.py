"""The `netkernel` command."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import __version__, api, bench, netns
from . import tenant as launcher
from .config import ENGINE_PID_FILE, LOG_FILE, PID_FILE, engine_binary, guestlib, load_config
from .errors import (
    DaemonAlreadyRunningError,
    KernelFeatureError,
    NetKernelError,
    NotRootError,
)

log = logging.getLogger("netkernel")

START_TIMEOUT = 30.0
STOP_TIMEOUT = 20.0
EXIT_NOT_RUNNING = 3  # `status` when the daemon is down (LSB convention)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="netkernel",
        description="Run unmodified programs in tenants whose network stack is host infrastructure.",
    )
    p.add_argument("--version", action="version", version=f"netkernel {__version__}")
    p.add_argument("--log-level", default="warning",
                   choices=["debug", "info", "warning", "error"], help="default: warning")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    up = sub.add_parser("up", help="start the daemon, the engine and the network fabric")
    up.add_argument("--config", type=Path, help="TOML config file (default: built-in)")
    up.add_argument("--foreground", action="store_true", help="run the daemon in this process")

    sub.add_parser("down", help="stop everything and remove what `up` created")

    st = sub.add_parser("status", help="is the daemon running; NSMs and tenant count")
    st.add_argument("--json", action="store_true")

    run = sub.add_parser("run", help="run a command in a tenant (created on first use)")
    run.add_argument("--tenant", required=True, metavar="NAME")
    run.add_argument("--nsm", metavar="NSM", help="NSM for a new tenant (default: the first)")
    run.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD [ARGS...]")

    t = sub.add_parser("tenant", help="create or delete tenants")
    tsub = t.add_subparsers(dest="tenant_command", required=True, metavar="ACTION")
    tc = tsub.add_parser("create", help="create a tenant")
    tc.add_argument("name")
    tc.add_argument("--nsm")
    td = tsub.add_parser("delete", help="kill a tenant's processes and remove it")
    td.add_argument("name")

    ps = sub.add_parser("ps", help="list tenants")
    ps.add_argument("--json", action="store_true")

    cn = sub.add_parser("conns", help="list connections")
    cn.add_argument("--tenant", metavar="NAME")
    cn.add_argument("--json", action="store_true")

    b = sub.add_parser("bench", help="measure NetKernel against the native stack (iperf3, sockperf, "
                       "nginx, redis, idle CPU)")
    b.add_argument("--json", action="store_true", help="print the results as JSON")
    b.add_argument("--quick", action="store_true", help="one run per side instead of three")
    b.add_argument("--duration", type=int, default=bench.DEFAULT_DURATION, metavar="SECONDS",
                   help=f"length of each timed run (default: {bench.DEFAULT_DURATION})")
    b.add_argument("--only", metavar="METRIC[,METRIC]",
                   help="measure only these: " + ", ".join(bench.METRIC_NAMES))
    return p


def require_root() -> None:
    if os.geteuid() != 0:
        raise NotRootError()


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(h) for h in headers]] + [["-" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of ours counts as gone.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


# -- commands --------------------------------------------------------------------------------

def cmd_up(args: argparse.Namespace) -> int:
    require_root()
    config_path = args.config.resolve() if args.config else None
    config = load_config(config_path)  # fail on a bad config before starting anything
    status = api.ping()
    if status is not None:
        raise DaemonAlreadyRunningError(status.get("pid"))
    missing = netns.check_kernel_features()
    if missing:
        raise KernelFeatureError("this kernel lacks: " + ", ".join(missing))
    engine_binary()
    guestlib()

    if args.foreground:
        from .daemon import Daemon
        # The daemon's own log format and level, on this terminal.
        logging.basicConfig(force=True, level=logging.DEBUG if args.log_level == "debug" else logging.INFO,
                            format="%(asctime)s netkernel[%(process)d] %(levelname)s %(name)s: %(message)s")
        return Daemon(config).run()

    cmd = [sys.executable, "-m", "netkernel.daemon", "--log-level",
           "debug" if args.log_level == "debug" else "info"]
    if config_path:
        cmd += ["--config", str(config_path)]
    LOG_FILE.parent.mkdir(parents=True, exist_ok=True)
    with open(LOG_FILE, "ab") as logf:
        offset = logf.tell()
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
                                start_new_session=True, close_fds=True)
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        status = api.ping()
        if status is not None and status.get("pid") == proc.pid:
            break
        code = proc.poll()
        if code is not None or time.monotonic() > deadline:
            if code is None:
                proc.terminate()
                proc.wait()
            _print_log_tail(offset)
            why = f"exited with status {code}" if code is not None else \
                f"was not ready within {START_TIMEOUT:.0f}s"
            raise NetKernelError(f"the daemon {why} (log above; full log in {LOG_FILE})")
        time.sleep(0.1)
    nsms = ", ".join(n["name"] for n in status.get("nsms", []))
    print(f"netkernel: up (daemon pid {proc.pid}, NSMs: {nsms}; log: {LOG_FILE})")
    return 0


def _print_log_tail(offset: int, lines: int = 20) -> None:
    try:
        with open(LOG_FILE, "rb") as f:
            f.seek(offset)
            text = f.read().decode(errors="replace")
    except OSError:
        return
    for line in text.splitlines()[-lines:]:
        print(f"  | {line}", file=sys.stderr)


def cmd_down(args: argparse.Namespace) -> int:
    require_root()
    from .daemon import cleanup_all

    pid = _read_pid(PID_FILE)
    status = api.ping()
    was_running = status is not None
    if status is not None:
        pid = int(status["pid"])
        try:
            api.call("shutdown", timeout=10.0)
        except NetKernelError as e:
            log.warning("shutdown request failed (%s); sending SIGTERM", e)
            os.kill(pid, signal.SIGTERM)
    elif pid is not None and _pid_alive(pid):
        # A daemon that no longer answers: ask the OS instead.
        was_running = True
        os.kill(pid, signal.SIGTERM)
    if pid is not None:
        _wait_gone(pid, "daemon")
    engine_pid = _read_pid(ENGINE_PID_FILE)
    if engine_pid is not None and _is_engine(engine_pid):
        os.kill(engine_pid, signal.SIGTERM)  # orphaned by a daemon that was killed
        _wait_gone(engine_pid, "engine")
    removed = cleanup_all()
    if was_running:
        print("netkernel: down")
    elif removed:
        print("netkernel: the daemon was not running; removed leftovers: " + ", ".join(removed))
    else:
        print("netkernel: not running (nothing to do)")
    return 0


def _is_engine(pid: int) -> bool:
    try:
        return os.readlink(f"/proc/{pid}/exe").endswith("netkernel-engine")
    except OSError:
        return False


def _wait_gone(pid: int, what: str) -> None:
    deadline = time.monotonic() + STOP_TIMEOUT
    while _pid_alive(pid):
        if time.monotonic() > deadline:
            log.warning("%s (pid %d) did not stop; killing it", what, pid)
            os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + 5
        time.sleep(0.05)


def cmd_status(args: argparse.Namespace) -> int:
    status = api.ping()
    if status is None:
        if args.json:
            print(json.dumps({"running": False}))
        else:
            print("netkernel: not running")
        return EXIT_NOT_RUNNING
    status.pop("ok", None)
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    print(f"netkernel: running (daemon pid {status['pid']}, engine pid {status['engine_pid']}, "
          f"up {status['uptime']:.0f}s), {status['tenants']} tenant(s)")
    print(table(["NSM", "KIND", "NETNS", "IPV4", "IPV6", "TENANTS"],
                [[n["name"], n["kind"], n["netns"], n["ipv4"], n["ipv6"], n["tenants"]]
                 for n in status["nsms"]]))
    return 0


def cmd_run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    cmd = list(args.cmd)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd:
        parser.error("run: missing command (usage: netkernel run --tenant NAME -- CMD [ARGS...])")
    require_root()
    launcher.resolve_command(cmd[0])  # exit 127 before any tenant is created
    reply = api.call("tenant-create", name=args.tenant, nsm=args.nsm)
    t = reply["tenant"]
    return launcher.run(args.tenant, t["netns_path"], t["resolv_conf"], cmd)


def cmd_tenant(args: argparse.Namespace) -> int:
    require_root()
    if args.tenant_command == "create":
        reply = api.call("tenant-create", name=args.name, nsm=args.nsm)
        t = reply["tenant"]
        verb = "created" if reply["created"] else "exists"
        print(f"tenant {t['name']} {verb}: nsm {t['nsm']}, {t['ipv4']}, {t['ipv6']}")
    else:
        api.call("tenant-delete", name=args.name)
        print(f"tenant {args.name} deleted")
    return 0


def _size(n: int | None) -> str | None:
    if n is None:
        return None
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024  # type: ignore[assignment]
    return None


def cmd_ps(args: argparse.Namespace) -> int:
    tenants = api.call("ps")["tenants"]
    if args.json:
        print(json.dumps({"tenants": tenants}, indent=2))
        return 0
    print(table(
        ["NAME", "NSM", "IPV4", "IPV6", "PIDS", "SOCKETS", "TX", "RX"],
        [[t["name"], t["nsm"], t["ipv4"], t["ipv6"], ",".join(map(str, t["pids"])) or "-",
          t["sockets"], _size(t["tx_bytes"]), _size(t["rx_bytes"])] for t in tenants]))
    return 0


def cmd_conns(args: argparse.Namespace) -> int:
    conns = api.call("conns", tenant=args.tenant)["conns"]
    if args.json:
        print(json.dumps({"conns": conns}, indent=2))
        return 0
    print(table(
        ["TENANT", "SLOT", "KIND", "STATE", "LOCAL", "PEER", "TX", "RX"],
        [[c["tenant"], c["slot"], c["kind"], c["state"], c["local"], c["peer"],
          _size(c["tx_bytes"]), _size(c["rx_bytes"])] for c in conns]))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=getattr(logging, args.log_level.upper()),
                        format="netkernel: %(levelname)s: %(message)s")
    try:
        if args.command == "up":
            return cmd_up(args)
        if args.command == "down":
            return cmd_down(args)
        if args.command == "status":
            return cmd_status(args)
        if args.command == "run":
            return cmd_run(args, parser)
        if args.command == "tenant":
            return cmd_tenant(args)
        if args.command == "ps":
            return cmd_ps(args)
        if args.command == "conns":
            return cmd_conns(args)
        if args.command == "bench":
            return bench.main(args)
        parser.error(f"unknown command {args.command}")
    except NetKernelError as e:
        print(f"netkernel: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return 130
    return 2


if __name__ == "__main__":
    sys.exit(main())
