"""RPT learns (and a shuffled-reward control does not): `make learn-check` through the normal code path."""
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_rpt_training_improves_heldout_accuracy_and_control_does_not(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "pipelines" / "learn_check.py"), "--out", str(tmp_path / "lc")],
                          capture_output=True, text=True, cwd=REPO, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in ("before", "after", "control_after"):
        assert 0.0 <= result[key] <= 1.0
    assert result["after"] - result["before"] >= 0.25, result
    assert result["control_after"] - result["before"] <= 0.05, result
