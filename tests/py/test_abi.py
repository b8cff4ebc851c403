"""The Python view of the ABI constants is generated from the C header and matches it; the
layouts the headers pin compile wherever they are promised (C, and abi.h in C++), and the
Python mirror of ServiceLib's layout in the daemon tests agrees with C."""

from __future__ import annotations

import ast
import importlib
import importlib.util
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from helpers_c import BASE_FLAGS, compiler

REPO = Path(__file__).resolve().parents[2]
INCLUDE = REPO / "include"


def load(path: Path) -> dict[str, int]:
    spec = importlib.util.spec_from_file_location("abi_fresh", path)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return {k: v for k, v in vars(mod).items() if k.startswith("NK_")}


def test_generated_constants(tmp_path: Path) -> None:
    out = tmp_path / "_abi.py"
    subprocess.run(
        [
            sys.executable,
            str(REPO / "tools" / "gen_abi.py"),
            str(REPO / "include" / "netkernel" / "abi.h"),
            str(out),
        ],
        check=True,
    )
    fresh = load(out)
    # Values the C side pins with static asserts or uses on the wire.
    assert fresh["NK_REGION_MAGIC"] == int.from_bytes(b"NKRG", "big")
    assert fresh["NK_MSG_READY"] == ord("R")
    assert fresh["NK_DEFAULT_RING_SIZE"] == 1024 * 1024
    assert fresh["NK_OP_REGISTER"] == 1


def test_installed_matches_header(tmp_path: Path) -> None:
    try:
        _abi = importlib.import_module("netkernel._abi")
    except ImportError:
        pytest.skip("netkernel is not installed from a build (no generated _abi)")
    out = tmp_path / "_abi.py"
    subprocess.run(
        [
            sys.executable,
            str(REPO / "tools" / "gen_abi.py"),
            str(REPO / "include" / "netkernel" / "abi.h"),
            str(out),
        ],
        check=True,
    )
    installed = {k: v for k, v in vars(_abi).items() if k.startswith("NK_")}
    assert installed == load(out), "installed package is stale: pip install . again"


def test_abi_header_compiles_as_cxx(tmp_path: Path) -> None:
    """abi.h offers C++ its layouts (NK_ATOMIC, NK_STATIC_ASSERT): keep that true."""
    cxx = next((c for c in ("c++", "g++", "clang++") if shutil.which(c)), None)
    if cxx is None:
        pytest.skip("no C++ compiler")
    src = tmp_path / "abi.cc"
    src.write_text('#include "netkernel/abi.h"\nint main() { return 0; }\n')
    proc = subprocess.run(
        [cxx, "-std=c++11", "-Wall", "-Wextra", "-Werror", f"-I{INCLUDE}", "-fsyntax-only", str(src)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


# The fake NSM of tests/robust/test_hostile_nsm.py reads and writes ServiceLib's memfd through
# these module-level names; they run only with a daemon, so their layout is checked here.
HOSTILE_NSM = REPO / "tests" / "robust" / "test_hostile_nsm.py"
MIRROR_NAMES = {"NQE", "CTL", "QUEUE_LEN", "QUEUE_BYTES", "REQ", "REP", "EVT"}
NQE_FIELDS = [
    "op",
    "flags",
    "tag",
    "sock",
    "arg",
    "len",
    "tenant",
    "off",
    "addr.family",
    "addr.port",
    "addr.scope_id",
    "addr.addr",
    "arg2",
    "reserved",
]
CTL_FIELDS = ["op", "version", "tenant", "reserved", "size", "ipv4", "ipv6", "name"]


def _python_mirror() -> dict[str, object]:
    """Executes only the mirror's own assignments, not the module (it needs a daemon)."""
    tree = ast.parse(HOSTILE_NSM.read_text())
    ns: dict[str, object] = {"struct": struct}
    for node in tree.body:
        if not isinstance(node, ast.Assign):
            continue
        names = {n.id for t in node.targets for n in ast.walk(t) if isinstance(n, ast.Name)}
        if names & MIRROR_NAMES:
            exec(compile(ast.Module(body=[node], type_ignores=[]), str(HOSTILE_NSM), "exec"), ns)
    missing = MIRROR_NAMES - ns.keys()
    assert not missing, f"{HOSTILE_NSM.name} no longer defines {missing}"
    return ns


def _offsets(fmt: str) -> list[int]:
    """Offset of each field of a little-endian ('<', unpadded) struct format."""
    assert fmt.startswith("<")
    out, at = [], 0
    for count, code in re.findall(r"(\d*)([a-zA-Z?])", fmt[1:]):
        for _ in range(1 if code in "sp" else int(count or 1)):
            out.append(at)
            at += struct.calcsize("<" + (count if code in "sp" else "") + code)
    return out


def _c_layout(tmp_path: Path, exprs: list[str]) -> list[int]:
    src = tmp_path / "layout.c"
    lines = "".join(f'  printf("%zu\\n", (size_t)({e}));\n' for e in exprs)
    src.write_text(
        f'#include <stdio.h>\n#include "netkernel/servicelib.h"\nint main(void) {{\n{lines}  return 0;\n}}\n'
    )
    exe = tmp_path / "layout"
    proc = subprocess.run([compiler(), *BASE_FLAGS, "-o", str(exe), str(src)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return [
        int(v) for v in subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout.split()
    ]


def test_python_servicelib_mirror_matches_c(tmp_path: Path) -> None:
    py = _python_mirror()
    nqe, ctl = py["NQE"], py["CTL"]
    assert isinstance(nqe, struct.Struct) and isinstance(ctl, struct.Struct)
    exprs = [
        "sizeof(struct nk_nqe)",
        "sizeof(struct nk_sl_ctl)",
        "NK_SL_QUEUE_LEN",
        "sizeof(struct nk_sl_queue)",
        "offsetof(struct nk_sl_shared, req)",
        "offsetof(struct nk_sl_shared, rep)",
        "offsetof(struct nk_sl_shared, evt)",
        "offsetof(struct nk_sl_queue, head)",
        "offsetof(struct nk_sl_queue, tail)",
        "offsetof(struct nk_sl_queue, e)",
    ]
    exprs += [f"offsetof(struct nk_nqe, {f})" for f in NQE_FIELDS]
    exprs += [f"offsetof(struct nk_sl_ctl, {f})" for f in CTL_FIELDS]
    c = _c_layout(tmp_path, exprs)
    # The fake NSM finds head at q + 0, tail at q + 64 and the elements at q + 192.
    want = [
        nqe.size,
        ctl.size,
        py["QUEUE_LEN"],
        py["QUEUE_BYTES"],
        py["REQ"],
        py["REP"],
        py["EVT"],
        0,
        64,
        192,
        *_offsets(nqe.format),
        *_offsets(ctl.format),
    ]
    assert dict(zip(exprs, c, strict=True)) == dict(zip(exprs, want, strict=True))
