"""Fair shares across hosts (tenant_cc): three lab hosts, tenant A (8 flows) on h1 and B
(1 flow) on h2 sending to h3 across a 300 Mbit/s bottleneck that no NetKernel is told about.
Shares are counted at the receivers (scripts/fairness.py, its short CI run)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import nk, requires_root

pytestmark = requires_root

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "fairness.py"


def test_tenants_share_a_bottleneck_between_hosts_by_weight(tmp_path: Path) -> None:
    nk("lab", "down")
    out = tmp_path / "fairness.json"
    r = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    print(r.stdout)
    assert r.returncode == 0, r.stdout + r.stderr
    fig = json.loads(out.read_text())
    # Each figure's line is in r.stdout, which pytest shows when an assertion below fails.
    # The control: without tenant_cc, Linux shares per flow and A's 8 flows take most of the
    # link. This is what shows the bottleneck is real and shared.
    assert fig["control"]["ratio"] > 2.0, fig["control"]["ratio"]
    assert 0.8 <= fig["equal"]["ratio"] <= 1.25, fig["equal"]["ratio"]
    assert 1.6 <= fig["weights_2_1"]["ratio"] <= 2.5, fig["weights_2_1"]["ratio"]
    assert fig["b_alone"]["utilisation"] >= 0.9, fig["b_alone"]["utilisation"]
    # Tenants joining and leaving: shares converge, and the one left gets the link back.
    for k in ("a_joins", "b_joins"):
        assert fig[k]["converged_s"] is not None and fig[k]["converged_s"] < 5, (k, fig[k]["converged_s"])
        assert fig[k]["regained_s"] is not None and fig[k]["regained_s"] < 5, (k, fig[k]["regained_s"])
    # The lab is gone: fairness.py removes it.
    assert "no lab is up" in nk("lab", "status").stderr
