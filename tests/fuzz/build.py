"""Build the engine's libFuzzer harnesses (tests/fuzz/fuzz_*.c) with clang, ASan and UBSan.

Each harness is its own C file that includes csrc/engine/main.c (see nk_fuzz.h); the other
engine sources and the NSM modules are compiled once per build directory and linked into
every harness. Nothing is written into the checkout.

    python3 tests/fuzz/build.py [--out DIR] [HARNESS ...]

prints the path of each harness built. test_fuzz.py and scripts/fuzz.sh use it; CLANG in the
environment picks the compiler (default: clang, then clang-19 ... clang-14).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
HARNESSES = ("fuzz_region", "fuzz_control", "fuzz_servicelib")
SANITIZE = ["-fsanitize=fuzzer,address,undefined", "-fno-sanitize-recover=undefined"]
# Engine objects are instrumented for coverage and the sanitizers, but get libFuzzer's main only
# at the link.
SANITIZE_OBJ = ["-fsanitize=fuzzer-no-link,address,undefined", "-fno-sanitize-recover=undefined"]
CFLAGS = [
    "-std=gnu11",
    "-g",
    "-O1",
    "-fno-omit-frame-pointer",
    "-Wall",
    "-Wextra",
    "-D_GNU_SOURCE",
    f"-I{REPO / 'include'}",
    f"-I{REPO / 'csrc' / 'engine'}",
    f"-I{HERE}",
    "-pthread",
]


class BuildError(Exception):
    pass


def find_clang() -> str | None:
    names = (
        [os.environ["CLANG"]]
        if os.environ.get("CLANG")
        else ["clang", *(f"clang-{v}" for v in range(19, 13, -1))]
    )
    for name in names:
        path = shutil.which(name)
        if path:
            return path
    return None


def unsupported_reason(clang: str | None = None) -> str | None:
    """None when clang can build and run a libFuzzer harness with ASan and UBSan, else why not."""
    clang = clang or find_clang()
    if not clang:
        return "no clang (install clang and libclang-rt-dev, e.g. clang-14 libclang-rt-14-dev)"
    with tempfile.TemporaryDirectory(prefix="nk-fuzz-probe-") as d:
        src = Path(d) / "probe.c"
        src.write_text(
            "#include <stdint.h>\n#include <stddef.h>\n"
            "int LLVMFuzzerTestOneInput(const uint8_t *d, size_t n) { (void)d; (void)n; "
            "return 0; }\n"
        )
        exe = Path(d) / "probe"
        proc = subprocess.run([clang, *SANITIZE, "-o", str(exe), str(src)], capture_output=True, text=True)
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["link failed"])[-1]
            return f"{clang} cannot link libFuzzer with ASan/UBSan (libclang-rt-dev missing?): {last}"
        run = subprocess.run([str(exe), "-runs=1"], capture_output=True, text=True, timeout=60)
        if run.returncode != 0:
            return f"a libFuzzer probe does not run: {run.stderr.strip()[-300:]}"
    return None


def engine_sources() -> list[Path]:
    srcs = sorted((REPO / "csrc" / "engine").glob("*.c")) + sorted((REPO / "csrc" / "nsm").glob("*.c"))
    return [s for s in srcs if s.name != "main.c"]  # main.c is part of each harness


def _digest(paths: list[Path], flags: list[str]) -> str:
    h = hashlib.sha256(" ".join(flags).encode())
    for p in paths:
        h.update(str(p).encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def _headers() -> list[Path]:
    return sorted(
        [
            *(REPO / "include").rglob("*.h"),
            *(REPO / "csrc" / "engine").glob("*.h"),
            REPO / "csrc" / "engine" / "main.c",
            *HERE.glob("*.h"),
        ]
    )


def _run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise BuildError(f"{' '.join(cmd)}\n{proc.stdout}{proc.stderr}")
    if proc.stderr.strip():  # warnings: show them, the build goes on
        sys.stderr.write(proc.stderr)


def build(
    names: list[str] | tuple[str, ...] = HARNESSES, out: Path | None = None, clang: str | None = None
) -> dict[str, Path]:
    """Build the named harnesses into out (default: a directory under the system's temp dir);
    returns name -> executable. Objects and executables are reused while no source changed."""
    clang = clang or find_clang()
    if not clang:
        raise BuildError("no clang")
    out = Path(out or Path(tempfile.gettempdir()) / "netkernel-fuzz-build").resolve()
    obj_dir = out / "obj"
    obj_dir.mkdir(parents=True, exist_ok=True)
    headers = _headers()
    flags = [*CFLAGS, *SANITIZE_OBJ]

    def compile_one(src: Path) -> Path:
        obj = obj_dir / f"{src.parent.name}-{src.stem}-{_digest([src, *headers], [clang, *flags])}.o"
        if not obj.exists():
            tmp = obj.with_suffix(f".tmp{os.getpid()}")
            _run([clang, *flags, "-c", "-o", str(tmp), str(src)])
            tmp.replace(obj)
        return obj

    jobs = max(1, min(8, os.cpu_count() or 1))
    with ThreadPoolExecutor(jobs) as pool:
        objs = list(pool.map(compile_one, engine_sources()))
    built: dict[str, Path] = {}
    for name in names:
        src = HERE / f"{name}.c"
        if not src.exists():
            raise BuildError(f"no harness {src}")
        exe = out / name
        stamp = out / f"{name}.stamp"
        key = _digest([src, *headers, *objs], [clang, *CFLAGS, *SANITIZE])
        if not (exe.exists() and stamp.exists() and stamp.read_text() == key):
            tmp = exe.with_name(f"{name}.tmp{os.getpid()}")
            _run([clang, *CFLAGS, *SANITIZE, "-o", str(tmp), str(src), *map(str, objs)])
            tmp.replace(exe)
            stamp.write_text(key)
        built[name] = exe
    return built


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=None, help="build directory")
    ap.add_argument("harness", nargs="*", default=list(HARNESSES), help=f"of {', '.join(HARNESSES)}")
    args = ap.parse_args()
    reason = unsupported_reason()
    if reason:
        print(f"build.py: {reason}", file=sys.stderr)
        return 77
    try:
        for exe in build(args.harness, args.out).values():
            print(exe)
    except BuildError as e:
        print(f"build.py: build failed: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
