"""`netkernel bench`: the options given, set up, measure, clean up, and the report."""

from __future__ import annotations

import json
import os
import resource
import signal
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from types import FrameType
from typing import IO, Any, TextIO

from ..errors import NotRootError
from .catalogue import (
    DEFAULT_DURATION,
    DEFAULT_REPETITIONS,
    QUICK_DURATION,
    BenchError,
    Options,
    select_configs,
    select_metrics,
)
from .probes import missing_message, missing_programs
from .report import Report, check_out_dir, render_table, write_outputs
from .workloads import Bench


class Interrupted(BaseException):
    """SIGTERM/SIGHUP while benchmarking: unwind through the cleanup like Ctrl-C."""


@contextmanager
def _signals(
    handler: Callable[[int, FrameType | None], None] | int, sigs: Sequence[signal.Signals]
) -> Iterator[None]:
    """sigs handled by handler (or SIG_IGN) meanwhile, their old handlers back after."""
    old = {s: signal.signal(s, handler) for s in sigs}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _interrupt(signum: int, _frame: FrameType | None) -> None:
    raise Interrupted(signal.Signals(signum).name)


# SIGTERM and SIGHUP unwind like Ctrl-C so that the cleanup runs; while cleaning up, a second
# Ctrl-C must not leave half the fabric behind.
INTERRUPTING = (signal.SIGTERM, signal.SIGHUP)
IGNORED_IN_CLEANUP = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def run_bench(opts: Options, progress: TextIO | None = None) -> Report:
    """Set up, measure, clean up (also on Ctrl-C, SIGTERM or an error)."""
    if os.geteuid() != 0:
        raise NotRootError()
    missing = missing_programs(opts.metrics, opts.configs)
    if missing:
        raise BenchError(missing_message(missing))
    # The load generators and servers inherit this process's descriptor limit: 5,000 redis
    # clients and 9,000 held connections need more than a shell's usual 1,024.
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    bench = Bench(opts, progress)
    interrupted: BaseException | None = None
    try:
        with _signals(_interrupt, INTERRUPTING):
            bench.setup()
            return bench.run_all()
    except (KeyboardInterrupt, Interrupted) as e:
        interrupted = e
        raise
    finally:
        with _signals(signal.SIG_IGN, IGNORED_IN_CLEANUP):
            if interrupted is not None:
                bench.say("interrupted: cleaning up")
            problems = bench.cleanup()
        for p in problems:
            bench.say(f"warning: cleanup: {p}")
        if interrupted is not None:
            bench.say("cleaned up")


def main(args: Any, stdout: IO[str] | None = None) -> int:
    """The `netkernel bench` command (args from cli.build_parser())."""
    out = stdout or sys.stdout
    duration = (
        args.duration if args.duration is not None else (QUICK_DURATION if args.quick else DEFAULT_DURATION)
    )
    if duration < 1:
        raise BenchError("--duration must be at least 1 second")
    reps = args.repetitions if args.repetitions is not None else (1 if args.quick else DEFAULT_REPETITIONS)
    if reps < 1:
        raise BenchError("--repetitions must be at least 1")
    opts = Options(
        duration=duration,
        repetitions=reps,
        metrics=select_metrics(args.only),
        quick=args.quick,
        configs=select_configs(args.configs),
        out=args.out,
    )
    if opts.out is not None:
        check_out_dir(opts.out)
    try:
        report = run_bench(opts)
    except Interrupted as e:
        print(f"netkernel: bench interrupted by {e}", file=sys.stderr)
        return 128 + int(getattr(signal, str(e), signal.SIGTERM))
    if args.json:
        print(json.dumps(report.as_json(), indent=2), file=out)
    else:
        print(render_table(report), file=out)
    if opts.out is not None:
        for path in write_outputs(report, opts.out):
            print(f"netkernel: bench: wrote {path}", file=sys.stderr)
    errors = report.errors
    for err in errors:
        print(f"netkernel: bench: {err}", file=sys.stderr)
    if errors:
        print(f"netkernel: bench: {len(errors)} measurement(s) failed", file=sys.stderr)
        return 1
    return 0
