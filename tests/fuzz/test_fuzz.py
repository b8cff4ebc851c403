"""The engine's libFuzzer harnesses (tests/fuzz/fuzz_*.c), each built with ASan and UBSan and run
for a short while over the committed corpus (tests/fuzz/corpus/<harness>/).

Each run is NETKERNEL_FUZZ_SECONDS long (default 60); scripts/fuzz.sh is the long run. A
crash, a sanitizer report, a leaked descriptor, an input slower than 5 s or more than 2 GiB of
memory fails the test, with libFuzzer's report and the input that did it. New corpus entries
and artifacts stay in pytest's temp dir; the committed corpus is only read.

Needs root (the harnesses make network namespaces of their own; no daemon, nothing of the
host's network is touched) and clang with libFuzzer (Debian: clang, libclang-rt-14-dev).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
CORPUS = HERE / "corpus"
SECONDS = int(float(os.environ.get("NETKERNEL_FUZZ_SECONDS", "60")))
TIMEOUT_S = 5

_spec = importlib.util.spec_from_file_location("nk_fuzz_build", HERE / "build.py")
assert _spec and _spec.loader
fuzzbuild = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fuzzbuild)


@pytest.fixture(scope="module")
def harnesses(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    if os.geteuid() != 0:
        pytest.skip("needs root: the harnesses make network namespaces of their own")
    reason = fuzzbuild.unsupported_reason()
    if reason:
        pytest.skip(reason)
    try:
        yield fuzzbuild.build(fuzzbuild.HARNESSES, tmp_path_factory.mktemp("fuzzbuild"))
    except fuzzbuild.BuildError as e:
        pytest.fail(f"the harnesses do not build: {e}")


def final_stats(text: str) -> str:
    """libFuzzer's last status line and its final counters, for the test's log."""
    status = [ln for ln in text.splitlines() if " cov: " in ln and ln.startswith("#")]
    stats = [ln for ln in text.splitlines() if ln.startswith("stat::")]
    return "\n".join(status[-1:] + stats)


@pytest.mark.timeout(SECONDS + 600)
@pytest.mark.parametrize("name", fuzzbuild.HARNESSES)
def test_fuzz(harnesses: dict[str, Path], name: str, tmp_path: Path) -> None:
    seeds = CORPUS / name
    assert seeds.is_dir() and any(seeds.iterdir()), f"no committed corpus in {seeds}"
    work = tmp_path / "corpus"  # new entries go to the first directory given
    work.mkdir()
    cmd = [
        str(harnesses[name]),
        f"-max_total_time={SECONDS}",
        f"-timeout={TIMEOUT_S}",
        "-rss_limit_mb=2048",
        "-close_fd_mask=2",
        "-print_final_stats=1",
        f"-artifact_prefix={tmp_path}/",
        str(work),
        str(seeds),
    ]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=SECONDS + 300, stdin=subprocess.DEVNULL
    )
    artifacts = sorted(p.name for p in tmp_path.iterdir() if p.is_file())
    print(f"{name}: {final_stats(proc.stderr)}")
    assert proc.returncode == 0, (
        f"{name} exited {proc.returncode}; artifacts in {tmp_path}: {artifacts}\n"
        f"reproduce: {harnesses[name]} -close_fd_mask=2 {tmp_path}/<artifact>\n"
        f"{proc.stderr[-6000:]}"
    )
    assert "DONE" in proc.stderr, proc.stderr[-3000:]
