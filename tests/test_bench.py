"""The lifecycle bench, run small: it must still work end to end, and a full four-step run must stay
within the issue's budget of history events and billable actions, counted from real histories.

The speed and memory figures are not asserted here (a noisy shared machine; ``bench/RESULTS.md``
keeps the measured ones): only what does not depend on timing.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_a_full_run_stays_within_60_events_and_14_actions_and_the_bench_reports_every_figure():
    done = subprocess.run([sys.executable, "-m", "bench.lifecycle", "--runs", "4", "--pace", "0.3"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    out = done.stdout
    assert "verdict" in out, (out + done.stderr)[-3000:]
    for line in ("PASS  validity: timed dunning runs that sent all 5 messages: 4/4",
                 "PASS  validity: reference runs that are full four-step runs",
                 "PASS  events per full run", "PASS  actions per full run"):
        assert line in out, out[-3000:]
    # the worker's CPU is its own process's, split by kind of thread: the deliveries show up
    # under "activities" on the dunning side only
    activities = re.search(r"activities +([\d.]+) -> +([\d.]+)", out)
    assert activities is not None, out[-3000:]
    assert float(activities.group(2)) > float(activities.group(1))
    assert re.search(r"per sleeping run: dunning \d+ KiB, baseline \d+ KiB", out)
