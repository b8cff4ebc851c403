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
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from . import __version__, api, bench, config, lab, netns, pids, vm
from . import tenant as launcher
from .config import (
    ENGINE_PID_FILE,
    LOG_FILE,
    PID_FILE,
    Policy,
    check_sysctl,
    engine_binary,
    format_rate,
    format_size,
    guestlib,
    load_config,
)
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


def _argument_type(parse: Callable[[str], Any], metavar: str) -> Callable[[str], Any]:
    """An argparse type from one of config's parsers: its ValueError text becomes the
    usage error (``argument --rate-tx: '20 0Mbit' is not a rate; use e.g. ...``)."""

    def convert(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    convert.__name__ = metavar  # argparse names the type in some messages
    return convert


def _sysctl_argument(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep:
        raise ValueError(f"{text!r} is not KEY=VALUE; use e.g. net.core.somaxconn=4096")
    return check_sysctl(key.strip(), value)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ValueError(f"{text!r} is not a positive number of seconds, e.g. 1 or 0.5")
    return value


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"{text!r} is not a positive whole number")
    return int(text)


def _add_policy_options(p: argparse.ArgumentParser) -> None:
    rate = _argument_type(config.parse_rate, "rate")
    p.add_argument(
        "--rate-tx",
        type=rate,
        metavar="RATE",
        help="egress limit in bits/s, e.g. 200Mbit, 1.5Gbit; 0 = unlimited",
    )
    p.add_argument("--rate-rx", type=rate, metavar="RATE", help="ingress limit, as --rate-tx")
    p.add_argument("--rate", type=rate, metavar="RATE", help="both limits at once")
    p.add_argument(
        "--weight",
        type=_argument_type(config.parse_weight, "weight"),
        metavar="W",
        help="share of a bottleneck relative to other tenants, 1-1000",
    )
    p.add_argument(
        "--max-sockets",
        type=_argument_type(config.parse_max_sockets, "count"),
        metavar="N",
        help=f"open sockets at most (1-{config.MAX_SLOTS}, capped at the "
        f"engine's {config.ENGINE_SLOTS} slots; 0 = no limit but the slots)",
    )
    p.add_argument(
        "--max-memory",
        type=_argument_type(config.parse_size, "size"),
        metavar="SIZE",
        help="shared memory for socket rings, e.g. 512MiB (2 MiB per socket); 0 = unlimited",
    )
    p.add_argument(
        "--shm",
        type=_argument_type(config.parse_switch, "switch"),
        metavar="on|off",
        help="connections to tenants on this host over shared memory (default on; "
        "both tenants must allow it)",
    )
    p.add_argument(
        "--tenant-cc",
        type=_argument_type(config.parse_switch, "switch"),
        metavar="on|off",
        help="tenant-level congestion control: at a congested link between hosts, all the "
        "tenant's connections together take one share by weight (default off)",
    )
    p.add_argument(
        "--max-process-memory",
        type=_argument_type(config.parse_size, "size"),
        metavar="SIZE",
        help="memory its processes may use together (its cgroup), "
        f"e.g. 1GiB; default {config.format_size(config.DEFAULT_PROCESS_MEMORY)}; 0 = unlimited",
    )
    p.add_argument(
        "--max-processes",
        type=_argument_type(config.parse_max_processes, "count"),
        metavar="N",
        help=f"processes and threads at most (default {config.DEFAULT_PROCESSES}; 0 = unlimited)",
    )


def _policy_args(args: argparse.Namespace) -> dict[str, Any]:
    """The policy options given, as API fields."""
    if args.rate is not None and (args.rate_tx is not None or args.rate_rx is not None):
        args.parser.error("--rate sets both directions; give either --rate or --rate-tx/--rate-rx")
    given = {
        "rate_tx": args.rate if args.rate is not None else args.rate_tx,
        "rate_rx": args.rate if args.rate is not None else args.rate_rx,
        "weight": args.weight,
        "max_sockets": args.max_sockets,
        "max_memory": args.max_memory,
        "shm": args.shm,
        "tenant_cc": args.tenant_cc,
        "max_process_memory": args.max_process_memory,
        "max_processes": args.max_processes,
    }
    return {k: v for k, v in given.items() if v is not None}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="netkernel",
        description="Run unmodified programs in tenants whose network stack is host infrastructure.",
    )
    p.add_argument("--version", action="version", version=f"netkernel {__version__}")
    p.add_argument(
        "--log-level",
        default="warning",
        choices=["debug", "info", "warning", "error"],
        help="default: warning",
    )
    p.add_argument(
        "--api-socket",
        type=Path,
        metavar="PATH",
        help="the daemon's API socket (default: $NETKERNEL_API_SOCKET or "
        f"{config.DAEMON_SOCKET}; `up` uses the config's [daemon] api_socket)",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(parent: Any, name: str, **kw: Any) -> argparse.ArgumentParser:
        sp: argparse.ArgumentParser = parent.add_parser(name, **kw)
        sp.set_defaults(parser=sp)  # for usage errors found after parsing
        return sp

    up = command(sub, "up", help="start the daemon, the engine and the network fabric")
    up.add_argument("--config", type=Path, help="TOML config file (default: built-in)")
    up.add_argument(
        "--foreground",
        action="store_true",
        help="run the daemon in this process, logging to stderr (for systemd)",
    )

    command(sub, "down", help="stop everything and remove what `up` created")

    upg = command(
        sub,
        "upgrade",
        help="replace the running engine live: open connections carry on (also: SIGHUP to the daemon)",
    )
    upg.add_argument(
        "--engine",
        type=Path,
        metavar="PATH",
        help="the new engine binary (default: the one installed with this netkernel)",
    )

    st = command(sub, "status", help="is the daemon running; NSMs and tenant count")
    st.add_argument("--json", action="store_true")

    run = command(sub, "run", help="run a command in a tenant (created on first use)")
    run.add_argument("--tenant", required=True, metavar="NAME")
    run.add_argument("--nsm", metavar="NSM", help="NSM for a new tenant (default: the first)")
    run.add_argument(
        "--rw",
        action="append",
        type=Path,
        default=[],
        metavar="PATH",
        help="let the program write PATH (the host's files are read-only in a tenant)",
    )
    run.add_argument(
        "--ro",
        action="append",
        type=Path,
        default=[],
        metavar="PATH",
        help="let the program read PATH where it is otherwise private (e.g. under /run)",
    )
    run.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD [ARGS...]")

    t = command(sub, "tenant", help="create, change, move, delete or list tenants")
    tsub = t.add_subparsers(dest="tenant_command", required=True, metavar="ACTION")
    tc = command(tsub, "create", help="create a tenant")
    tc.add_argument("name")
    tc.add_argument("--nsm", help="its NSM (default: the first)")
    _add_policy_options(tc)
    ts = command(tsub, "set", help="change a tenant's policy, live")
    ts.add_argument("name")
    _add_policy_options(ts)
    tm = command(tsub, "move", help="move a tenant to another NSM; open connections stay where they are")
    tm.add_argument("name")
    tm.add_argument("--nsm", required=True, help="the NSM to move to")
    td = command(tsub, "delete", help="kill a tenant's processes and remove it")
    td.add_argument("name")
    tl = command(tsub, "list", help="list tenants (as `netkernel ps`)")
    tl.add_argument("--json", action="store_true")

    ps = command(sub, "ps", help="list tenants: NSM, processes, sockets, bytes, rates, policy")
    ps.add_argument("--json", action="store_true")

    cn = command(sub, "conns", help="list connections, with TCP_INFO from the NSM")
    cn.add_argument("--tenant", metavar="NAME")
    cn.add_argument("--json", action="store_true")

    top = command(sub, "top", help="live per-tenant rates (Ctrl-C to quit)")
    top.add_argument(
        "--interval",
        type=_argument_type(_positive_float, "seconds"),
        default=1.0,
        metavar="S",
        help="seconds between refreshes (default: 1)",
    )
    top.add_argument(
        "--iterations",
        type=_argument_type(_positive_int, "count"),
        metavar="N",
        help="stop after N refreshes (default: until Ctrl-C)",
    )
    top.add_argument("--json", action="store_true", help="one JSON object per refresh")

    n = command(sub, "nsm", help="list, add or remove NSMs")
    nsub = n.add_subparsers(dest="nsm_command", required=True, metavar="ACTION")
    nl = command(nsub, "list", help="NSMs with their settings, tenants and traffic")
    nl.add_argument("--json", action="store_true")
    na = command(nsub, "add", help="add an NSM: the kernel stack in its own namespace, or lwIP")
    na.add_argument("name")
    na.add_argument(
        "--type",
        choices=config.NSM_KINDS,
        default="kernel",
        help="kernel (default): Linux's stack, with its own sysctls; lwip: the lwIP "
        "userspace stack in a process of its own",
    )
    na.add_argument(
        "--congestion-control",
        type=_argument_type(config.check_congestion_control, "name"),
        metavar="NAME",
        help="TCP congestion control, one of: " + " ".join(config.available_congestion_control()),
    )
    na.add_argument(
        "--bandwidth",
        type=_argument_type(config.parse_rate, "rate"),
        metavar="RATE",
        help="the uplink's capacity, shared between tenants by weight, e.g. 500Mbit",
    )
    na.add_argument(
        "--sysctl",
        type=_argument_type(_sysctl_argument, "sysctl"),
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a net.* sysctl in its namespace (repeatable)",
    )
    nr = command(nsub, "remove", help="remove an NSM that no tenant uses")
    nr.add_argument("name")

    b = command(
        sub,
        "bench",
        help="measure NetKernel against native, pasta and slirp4netns "
        "(iperf3, sockperf, nginx, redis, idle CPU)",
    )
    b.add_argument("--json", action="store_true", help="print the results as JSON")
    b.add_argument(
        "--quick",
        action="store_true",
        help=f"one run per configuration instead of {bench.DEFAULT_REPETITIONS}, "
        f"{bench.QUICK_DURATION} s each unless --duration is given",
    )
    b.add_argument(
        "--duration",
        type=int,
        default=None,
        metavar="SECONDS",
        help=f"length of each timed run (default: {bench.DEFAULT_DURATION})",
    )
    b.add_argument(
        "--repetitions",
        type=int,
        default=None,
        metavar="N",
        help=f"runs per configuration and metric (default: {bench.DEFAULT_REPETITIONS})",
    )
    b.add_argument(
        "--only", metavar="METRIC[,METRIC]", help="measure only these: " + ", ".join(bench.METRIC_NAMES)
    )
    b.add_argument(
        "--configs",
        metavar="CONFIG[,CONFIG]",
        help="besides native and netkernel, only these: "
        + ", ".join(bench.OTHERS)
        + " (default: all; 'none' for none)",
    )
    b.add_argument(
        "--out", metavar="DIR", type=Path, help="also write results.md, results.json and charts/*.png there"
    )

    lb = command(sub, "lab", help="several NetKernel hosts on this machine, joined by a shaped fabric")
    lsub = lb.add_subparsers(dest="lab_command", required=True, metavar="ACTION")
    lu = command(lsub, "up", help="build the hosts and the fabric, and start a daemon on each")
    lu.add_argument("--hosts", type=_argument_type(_positive_int, "count"), default=3, help="default: 3")
    lu.add_argument(
        "--link",
        action="append",
        default=[],
        metavar="HOST:SPEC",
        help="shape a host's link, both ways: e.g. h3:rate=300mbit,delay=2ms,loss=0.1%%,queue=20ms",
    )
    lu.add_argument(
        "--subnet",
        action="append",
        default=[],
        metavar="HOST=PREFIX",
        help="a host's IPv4 subnet instead of 198.18.(16*i).0/20",
    )
    lu.add_argument(
        "--congestion-control",
        metavar="NAME",
        help="TCP congestion control of every host's NSM (default: the kernel's default)",
    )
    command(lsub, "down", help="stop the hosts' daemons and remove the lab")
    ls_ = command(lsub, "status", help="the hosts, their addresses and links")
    ls_.add_argument("--json", action="store_true")
    le = command(lsub, "exec", help="run a command on a host (e.g. netkernel run ... there)")
    le.add_argument("host")
    le.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD [ARGS...]")

    v = command(sub, "vm", help="VM tenants: QEMU guests whose only network is NetKernel")
    vsub = v.add_subparsers(dest="vm_command", required=True, metavar="ACTION")
    vs = command(vsub, "start", help="boot a VM as tenant NAME (created if needed); it has no NIC")
    vs.add_argument("name")
    vs.add_argument(
        "--memory", default="512M", metavar="SIZE", help="guest memory, e.g. 512M or 2G (default 512M)"
    )
    vs.add_argument("--cpus", type=_argument_type(_positive_int, "count"), default=1, help="default: 1")
    vs.add_argument("--nsm", help="the tenant's NSM (default: the first)")
    vs.add_argument(
        "--accel",
        choices=("tcg", "kvm"),
        help="force QEMU's accelerator (default: kvm where hardware KVM is present, else tcg)",
    )
    vt = command(vsub, "stop", help="power the VM off (its tenant stays; `tenant delete` removes it)")
    vt.add_argument("name")
    vl = command(vsub, "list", help="running VMs")
    vl.add_argument("--json", action="store_true")
    ve = command(vsub, "exec", help="run a command in the VM; its output and exit status come back")
    ve.add_argument("name")
    ve.add_argument("--cwd", default="/", help="its working directory in the guest (default /)")
    ve.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="add to its environment")
    ve.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD [ARGS...]")
    return p


def require_root() -> None:
    if os.geteuid() != 0:
        raise NotRootError()


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(h) for h in headers]] + [["-" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells)


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


# -- commands --------------------------------------------------------------------------------


def cmd_up(args: argparse.Namespace) -> int:
    require_root()
    config_path = args.config.resolve() if args.config else None
    cfg = load_config(config_path)  # fail on a bad config before starting anything
    status = api.ping(cfg.api_socket)
    if status is not None:
        raise DaemonAlreadyRunningError(status.get("pid"))
    missing = netns.check_kernel_features()
    if missing:
        raise KernelFeatureError("this kernel lacks: " + ", ".join(missing))
    engine_binary()
    guestlib()

    if args.foreground:
        from .daemon import Daemon
        from .daemon_log import configure_logging

        # The daemon's own log format and level, on stderr (the journal under systemd).
        configure_logging("debug" if args.log_level == "debug" else "info", cfg.log_format)
        return Daemon(cfg).run()

    cmd = [
        sys.executable,
        "-m",
        "netkernel.daemon",
        "--log-level",
        "debug" if args.log_level == "debug" else "info",
    ]
    if config_path:
        cmd += ["--config", str(config_path)]
    LOG_FILE.parent.mkdir(parents=True, exist_ok=True)
    with open(LOG_FILE, "ab") as logf:
        offset = logf.tell()
        proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, start_new_session=True, close_fds=True
        )
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        status = api.ping(cfg.api_socket)
        if status is not None and status.get("pid") == proc.pid:
            break
        code = proc.poll()
        if code is not None or time.monotonic() > deadline:
            if code is None:
                proc.terminate()
                proc.wait()
            _print_log_tail(offset)
            why = (
                f"exited with status {code}"
                if code is not None
                else f"was not ready within {START_TIMEOUT:.0f}s"
            )
            raise NetKernelError(f"the daemon {why} (log above; full log in {LOG_FILE})")
        time.sleep(0.1)
    nsms = ", ".join(n["name"] for n in status.get("nsms", []))
    extra = f", API {cfg.api_socket}" if cfg.api_socket != config.DAEMON_SOCKET else ""
    print(f"netkernel: up (daemon pid {proc.pid}, NSMs: {nsms}{extra}; log: {LOG_FILE})")
    if status.get("connections"):
        print(f"connections: {status['connections']['summary']}")
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
    from .fabric import cleanup_all

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
    elif pid is not None and pids.alive(pid):
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
    while pids.alive(pid):
        if time.monotonic() > deadline:
            log.warning("%s (pid %d) did not stop; killing it", what, pid)
            os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + 5
        time.sleep(0.05)


def _print_json(doc: object, compact: bool = False) -> None:
    print(json.dumps(doc, indent=None if compact else 2))


def cmd_upgrade(args: argparse.Namespace) -> int:
    engine = args.engine
    if engine is not None:
        engine = engine.resolve()
        if not engine.is_file() or not os.access(engine, os.X_OK):
            args.parser.error(f"--engine {args.engine}: not an executable file")
    r = api.call("upgrade", engine=str(engine) if engine else None)
    print(
        f"netkernel: engine upgraded: pid {r['old_pid']} -> {r['pid']}, {r['sockets']} socket(s) "
        f"handed over, data path paused {r['pause_ms']:.1f} ms"
    )
    return 0


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
        _print_json(status)
        return 0
    print(
        f"netkernel: running (daemon pid {status['pid']}, engine pid {status['engine_pid']}, "
        f"up {status['uptime']:.0f}s), {status['tenants']} tenant(s)"
    )
    if status.get("engine_failed"):
        print(f"engine: DOWN: {status['engine_failed']}")
    elif status.get("engine_restarts"):
        print(f"engine: restarted {status['engine_restarts']} time(s) after it died (see the daemon's log)")
    if status.get("metrics"):
        print(f"metrics: {status['metrics']}")
    if status.get("connections"):
        print(f"connections: {status['connections']['summary']}")
    sb = status.get("sandbox")
    if sb:
        held = ", ".join(f"{c} ({v})" for c, v in sb["cgroups"].items()) or "none"
        missing = (
            f"; no {', '.join(sb['cgroups_missing'])} controller: not limited"
            if sb["cgroups_missing"]
            else ""
        )
        print(f"tenants sandboxed: cgroups {held}{missing}; firewall {sb['firewall']}")
    print(
        table(
            ["NSM", "KIND", "NETNS", "IPV4", "IPV6", "CC", "BANDWIDTH", "TENANTS"],
            [
                [
                    n["name"],
                    n["kind"],
                    n["netns"],
                    n["ipv4"],
                    n["ipv6"],
                    n.get("congestion_control"),
                    _limit(n.get("bandwidth"), "-"),
                    n["tenants"],
                ]
                for n in status["nsms"]
            ],
        )
    )
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    cmd = list(args.cmd)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd:
        args.parser.error("run: missing command (usage: netkernel run --tenant NAME -- CMD [ARGS...])")
    require_root()
    launcher.resolve_command(cmd[0])  # exit 127 before any tenant is created
    reply = api.call("tenant-create", name=args.tenant, nsm=args.nsm)
    t = reply["tenant"]
    # Absolute, not resolved: the sandbox follows symbolic links itself, checking each.
    rw = [Path(p) for p in t.get("rw", [])] + [p.absolute() for p in args.rw]
    ro = [Path(p) for p in t.get("ro", [])] + [p.absolute() for p in args.ro]
    return launcher.run(t, cmd, rw=rw, ro=ro)


def _limit(bits: int | None, zero: str = "unlimited") -> str | None:
    """A configured rate: 200Mbit, or ``zero`` for 0."""
    if bits is None:
        return None
    return zero if bits == 0 else format_rate(bits)


def _bps(bits: float | None) -> str | None:
    """A measured rate."""
    if bits is None:
        return None
    return "0" if bits < 1 else format_rate(round(bits)) + "/s"


def _bytes(n: int | None) -> str | None:
    return None if n is None else format_size(n)


def _describe_policy(policy: dict[str, Any]) -> str:
    return Policy(**policy).describe()


def cmd_tenant(args: argparse.Namespace) -> int:
    action = args.tenant_command
    if action == "list":
        return cmd_ps(args)
    if action == "create":
        reply = api.call("tenant-create", name=args.name, nsm=args.nsm, **_policy_args(args))
        t = reply["tenant"]
        verb = "created" if reply["created"] else "exists"
        print(
            f"tenant {t['name']} {verb}: nsm {t['nsm']}, {t['ipv4']}, {t['ipv6']}, "
            f"{_describe_policy(t['policy'])}"
        )
    elif action == "set":
        changes = _policy_args(args)
        if not changes:
            args.parser.error(
                "nothing to change: give --rate-tx, --rate-rx, --rate, --weight, "
                "--max-sockets, --max-memory, --shm, --max-process-memory or "
                "--max-processes"
            )
        t = api.call("tenant-set", name=args.name, **changes)["tenant"]
        print(f"tenant {t['name']}: {_describe_policy(t['policy'])}")
    elif action == "move":
        reply = api.call("tenant-move", name=args.name, nsm=args.nsm)
        t = reply["tenant"]
        if not reply["moved"]:
            print(f"tenant {t['name']} is already on NSM {t['nsm']}")
        else:
            print(
                f"tenant {t['name']} moved to NSM {t['nsm']}: new connections use it; "
                f"{reply['pinned_flows']} open connection(s) stay on NSM "
                f"{', '.join(t['draining'])} until they close"
            )
            if reply.get("warning"):
                print(f"netkernel: warning: {reply['warning']}", file=sys.stderr)
    else:
        api.call("tenant-delete", name=args.name)
        print(f"tenant {args.name} deleted")
    return 0


def _ps_rows(tenants: list[dict[str, Any]]) -> list[list[Any]]:
    rows = []
    for t in tenants:
        nsm = t["nsm"] + (f" (from {','.join(t['draining'])})" if t.get("draining") else "")
        p = t["policy"]
        rows.append(
            [
                t["name"],
                nsm,
                t["ipv4"],
                ",".join(map(str, t["pids"])) or "-",
                t["sockets"],
                _bytes(t["memory"]),
                _bytes(t["tx_bytes"]),
                _bytes(t["rx_bytes"]),
                _bps(t["tx_bps"]),
                _bps(t["rx_bps"]),
                _limit(p["rate_tx"]),
                _limit(p["rate_rx"]),
                p["weight"],
                p["max_sockets"] or "unlimited",
                format_size(p["max_memory"], zero="unlimited"),
            ]
        )
    return rows


PS_HEADERS = [
    "NAME",
    "NSM",
    "IPV4",
    "PIDS",
    "SOCKETS",
    "MEMORY",
    "TX",
    "RX",
    "TX/S",
    "RX/S",
    "LIMIT-TX",
    "LIMIT-RX",
    "WEIGHT",
    "MAX-SOCKETS",
    "MAX-MEMORY",
]


def cmd_ps(args: argparse.Namespace) -> int:
    tenants = api.call("ps")["tenants"]
    if args.json:
        _print_json({"tenants": tenants})
        return 0
    print(table(PS_HEADERS, _ps_rows(tenants)))
    return 0


def _rtt(us: int | None) -> str | None:
    return None if us is None else f"{us / 1000:.2f}ms"


def cmd_conns(args: argparse.Namespace) -> int:
    conns = api.call("conns", tenant=args.tenant)["conns"]
    if args.json:
        _print_json({"conns": conns})
        return 0
    print(
        table(
            [
                "TENANT",
                "NSM",
                "PATH",
                "PROTO",
                "KIND",
                "STATE",
                "LOCAL",
                "PEER",
                "TX",
                "RX",
                "RTT",
                "CWND",
                "RETRANS",
                "DELIVERY",
                "CC",
            ],
            [
                [
                    c["tenant"],
                    c.get("nsm"),
                    (f"shm:{c['peer_tenant']}" if c.get("peer_tenant") else c.get("path") or "")
                    + ("/relay" if c.get("carrier") == "direct" else ""),
                    c.get("proto"),
                    c.get("kind"),
                    c.get("tcp_state") or c.get("state"),
                    c.get("local"),
                    c.get("peer"),
                    _bytes(c.get("tx_bytes")),
                    _bytes(c.get("rx_bytes")),
                    _rtt(c.get("rtt_us")),
                    c.get("cwnd"),
                    None if c.get("retrans") is None else f"{c['retrans']}/{c.get('total_retrans')}",
                    None if c.get("delivery_rate") is None else _bps(c["delivery_rate"] * 8),
                    c.get("ca"),
                ]
                for c in conns
            ],
        )
    )
    return 0


TOP_HEADERS = [
    "NAME",
    "NSM",
    "SOCKETS",
    "TX/S",
    "RX/S",
    "LIMIT-TX",
    "LIMIT-RX",
    "WEIGHT",
    "CC-ALLOWED",
    "QDELAY",
    "RETRANS",
    "TX",
    "RX",
]
CLEAR_SCREEN = "\x1b[H\x1b[2J"


def _cc_columns(t: dict[str, Any]) -> list[str | None]:
    """CC-ALLOWED, QDELAY, RETRANS: what tenant_cc lets the tenant send (off, unlimited until
    congestion is seen, or a rate) and the congestion its connections see. A daemon of an
    older version reports none of it: blanks."""
    if not t["policy"].get("tenant_cc"):
        return ["off", None, None]
    rate, qdelay = t.get("cc_rate_bps"), t.get("cc_queue_delay_seconds")
    return [
        None if rate is None else "unlimited" if rate == 0 else format_rate(rate) + "/s",
        None if qdelay is None else f"{qdelay * 1000:.2f}ms",
        t.get("cc_retransmits"),
    ]


def cmd_top(args: argparse.Namespace) -> int:
    """Refresh a per-tenant rates table every --interval seconds (rates are the daemon's,
    sampled from the engine every second)."""
    tty = sys.stdout.isatty()
    count = 0
    try:
        while True:
            tenants = api.call("ps")["tenants"]
            now = time.time()
            if args.json:
                print(json.dumps({"time": round(now, 3), "tenants": tenants}), flush=True)
            else:
                rows = [
                    [
                        t["name"],
                        t["nsm"],
                        t["sockets"],
                        _bps(t["tx_bps"]),
                        _bps(t["rx_bps"]),
                        _limit(t["policy"]["rate_tx"]),
                        _limit(t["policy"]["rate_rx"]),
                        t["policy"]["weight"],
                        *_cc_columns(t),
                        _bytes(t["tx_bytes"]),
                        _bytes(t["rx_bytes"]),
                    ]
                    for t in tenants
                ]
                head = (
                    f"netkernel top - {datetime.fromtimestamp(now):%H:%M:%S}, {len(tenants)} "
                    f"tenant(s), every {args.interval:g}s (Ctrl-C to quit)"
                )
                print(
                    (CLEAR_SCREEN if tty else "")
                    + head
                    + "\n"
                    + table(TOP_HEADERS, rows)
                    + ("" if tty else "\n"),
                    flush=True,
                )
            count += 1
            if args.iterations is not None and count >= args.iterations:
                return 0
            time.sleep(args.interval)
    except KeyboardInterrupt:
        return 0


def cmd_nsm(args: argparse.Namespace) -> int:
    action = args.nsm_command
    if action == "list":
        nsms = api.call("nsm-list")["nsms"]
        if args.json:
            _print_json({"nsms": nsms})
            return 0
        print(
            table(
                [
                    "NAME",
                    "KIND",
                    "NETNS",
                    "IPV4",
                    "IPV6",
                    "CC",
                    "BANDWIDTH",
                    "TENANTS",
                    "SOCKETS",
                    "TX",
                    "RX",
                    "TX/S",
                    "RX/S",
                ],
                [
                    [
                        n["name"],
                        n["kind"],
                        n["netns"],
                        n["ipv4"] or "-",
                        n["ipv6"] or "-",
                        n["congestion_control"] or "-",
                        _limit(n["bandwidth"], "-"),
                        ",".join(n["tenants"] + [f"{d}(draining)" for d in n["draining"]]) or "-",
                        n["sockets"],
                        _bytes(n["tx_bytes"]),
                        _bytes(n["rx_bytes"]),
                        _bps(n["tx_bps"]),
                        _bps(n["rx_bps"]),
                    ]
                    for n in nsms
                ],
            )
        )
    elif action == "add":
        n = api.call(
            "nsm-add",
            name=args.name,
            kind=args.type,
            congestion_control=args.congestion_control,
            bandwidth=args.bandwidth,
            sysctl=dict(args.sysctl) or None,
        )["nsm"]
        if n["kind"] != "kernel":
            print(
                f"nsm {n['name']} added: {n['kind']}, netns {n['netns']}, process {n['pid']}"
                + (f", bandwidth {format_rate(n['bandwidth'])}" if n["bandwidth"] else "")
            )
        else:
            print(
                f"nsm {n['name']} added: netns {n['netns']}, {n['ipv4']}, {n['ipv6']}, "
                f"congestion control {n['congestion_control']}"
                + (f", bandwidth {format_rate(n['bandwidth'])}" if n["bandwidth"] else "")
            )
    else:
        api.call("nsm-remove", name=args.name)
        print(f"nsm {args.name} removed")
    return 0


def cmd_lab(args: argparse.Namespace) -> int:
    require_root()
    if args.lab_command == "up":
        hosts = lab.plan(args.hosts, args.link, args.subnet, args.congestion_control)
        lab.up(hosts)
        for h in hosts:
            link = ",".join(f"{k}={v}" for k, v in h.link.items()) or "unshaped"
            print(
                f"{h.name}: {h.ipv4_subnet} {h.ipv6_prefix}, fabric {h.fabric_v4}, zone {h.zone}, link {link}"
            )
        print("netkernel: lab up (run commands on a host with `netkernel lab exec HOST -- CMD`)")
        return 0
    if args.lab_command == "down":
        problems = lab.down()
        for p in problems:
            print(f"netkernel: {p}", file=sys.stderr)
        print("netkernel: lab down" + (" (with the problems above)" if problems else ""))
        return 1 if problems else 0
    if args.lab_command == "status":
        rows = lab.status()
        if args.json:
            print(json.dumps(rows, indent=1))
        else:
            print(
                table(
                    ["HOST", "DAEMON", "IPV4", "IPV6", "FABRIC", "ZONE", "LINK"],
                    [
                        [
                            r["host"],
                            r["daemon_pid"] or "stopped",
                            r["ipv4_subnet"],
                            r["ipv6_prefix"],
                            " ".join(r["fabric"]),  # type: ignore[arg-type]
                            r["zone"],
                            ",".join(f"{k}={v}" for k, v in r["link"].items()) or "-",  # type: ignore[attr-defined]
                        ]
                        for r in rows
                    ],
                )
            )
        return 0
    cmd = list(args.cmd)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd:
        args.parser.error("lab exec: missing command (usage: netkernel lab exec HOST -- CMD [ARGS...])")
    argv = lab.exec_argv(lab.find(lab.load(), args.host), cmd)
    os.execvp(argv[0], argv)


def cmd_vm(args: argparse.Namespace) -> int:
    require_root()
    if args.vm_command == "start":
        st = vm.start(
            args.name, vm.parse_memory(args.memory), args.cpus, vm.accel_choice(args.accel), args.nsm
        )
        print(
            f"vm {st['name']} up in {st['boot_s']:.1f} s ({st['accel']}, {st['cpus']} cpu, "
            f"{st['memory_mib']} MiB): tenant {st['tenant']}, {st['ipv4']}, {st['ipv6']}; no NIC "
            f"(run commands with `netkernel vm exec {st['name']} -- CMD`)"
        )
        return 0
    if args.vm_command == "stop":
        vm.stop(args.name)
        print(f"vm {args.name} stopped")
        return 0
    if args.vm_command == "list":
        rows = vm.vms()
        if args.json:
            print(json.dumps(rows, indent=1))
        else:
            print(
                table(
                    ["NAME", "TENANT", "ACCEL", "CPUS", "MEMORY", "UP", "QEMU-PID", "IPV4"],
                    [
                        [
                            r["name"],
                            r["tenant"],
                            r["accel"],
                            r["cpus"],
                            f"{r['memory_mib']}M",
                            f"{time.time() - r['started']:.0f}s",
                            r["qemu"],
                            r["ipv4"],
                        ]
                        for r in rows
                    ],
                )
            )
        return 0
    cmd = list(args.cmd)
    # Options may also come after NAME (argparse hands everything after it to cmd).
    while cmd and cmd[0] in ("--cwd", "--env") and len(cmd) > 1:
        if cmd[0] == "--cwd":
            args.cwd = cmd[1]
        else:
            args.env.append(cmd[1])
        cmd = cmd[2:]
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd:
        args.parser.error("vm exec: missing command (usage: netkernel vm exec NAME -- CMD [ARGS...])")
    env = {}
    for kv in args.env:
        key, eq, value = kv.partition("=")
        if not eq or not key:
            args.parser.error(f"vm exec: --env {kv!r}: give it as KEY=VALUE")
        env[key] = value
    return vm.exec_(args.name, cmd, cwd=args.cwd, env=env)


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "up": cmd_up,
    "down": cmd_down,
    "status": cmd_status,
    "upgrade": cmd_upgrade,
    "run": cmd_run,
    "tenant": cmd_tenant,
    "ps": cmd_ps,
    "conns": cmd_conns,
    "top": cmd_top,
    "nsm": cmd_nsm,
    "bench": bench.main,
    "lab": cmd_lab,
    "vm": cmd_vm,
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()), format="netkernel: %(levelname)s: %(message)s"
    )
    api.socket_override = args.api_socket
    try:
        return COMMANDS[args.command](args)
    except NetKernelError as e:
        print(f"netkernel: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
