"""The soak, short (scripts/soak.py; a 30-minute run's figures are in docs/operations.md).

nginx, redis, iperf3, checksummed bulk transfers (one tenant on lwIP) and tenants created and
deleted, all at once, while the engine is killed twice and upgraded twice, the lwIP process
is killed and a tenant's sender is killed with -9. Nothing may be corrupt, fail outside a
kill, hang or leak (descriptors, namespaces, tenants).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SOAK = Path(__file__).resolve().parents[2] / "scripts" / "soak.py"


pytestmark = pytest.mark.usefixtures("fresh_daemon_after")  # it kills the engine on purpose


def test_short_soak(tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    proc = subprocess.run(
        [sys.executable, str(SOAK), "--minutes", "1.5", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    print(proc.stdout)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    r = json.loads(out.read_text())
    assert r["faults"]["engine_killed"] == 2 and r["faults"]["engine_upgraded"] == 2, r["faults"]
    assert r["faults"]["lwip_killed"] >= 1 and r["faults"]["tenant_killed"] >= 1, r["faults"]
    for name, w in r["workloads"].items():
        assert w["ok"] > 0, (name, w)
