"""`make demo`'s command, as a newcomer runs it: it must finish by itself and tell the story."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

DUNNING = str(Path(sys.executable).parent / "dunning")


def test_demo_shows_reminders_a_payment_and_a_handoff(tmp_path: Path):
    result = subprocess.run([DUNNING, "demo"], cwd=tmp_path, capture_output=True, text=True,
                            timeout=180, env={**os.environ, "NO_PROXY": "127.0.0.1,localhost"})
    assert result.returncode == 0, result.stderr[-2000:]
    output = result.stdout
    assert re.search(r"Temporal Web UI: http://127\.0\.0\.1:\d+/namespaces/default/workflows", output)
    assert re.search(r"INV-DEMO-1001 +payment +accepted", output)
    assert re.search(r"INV-DEMO-1001 +state +paid", output)
    assert re.search(r"INV-DEMO-1002 +state +handed_off", output)
    assert re.search(r"INV-DEMO-1003 +communication sent +sms_reminder email", output)  # no phone
    assert re.search(r"INV-DEMO-1004 +communication skipped +friendly_reminder", output)  # late
    assert (tmp_path / ".dunning" / "demo" / "dunning.db").exists()
