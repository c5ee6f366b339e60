"""`make demo`'s command, as a newcomer runs it: it must tell the story, and `--keep` must stop
cleanly when a service manager (or Ctrl-C) stops it."""

from __future__ import annotations

import contextlib
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import requests

import devserver

DUNNING = str(Path(sys.executable).parent / "dunning")


def test_demo_tells_the_story_and_stops_cleanly_on_sigterm(tmp_path: Path):
    process = subprocess.Popen([DUNNING, "demo", "--keep"], cwd=tmp_path, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               env={**os.environ, "NO_PROXY": "127.0.0.1,localhost", "PYTHONUNBUFFERED": "1"})
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in process.stdout],  # type: ignore[union-attr]
                     daemon=True).start()
    output = ""
    try:
        deadline = time.monotonic() + 180
        while "keep running" not in output and time.monotonic() < deadline:
            with contextlib.suppress(queue.Empty):
                output += lines.get(timeout=1)
        assert "keep running" in output, output[-3000:]
        ui_port = int(re.search(r"http://127\.0\.0\.1:(\d+)/namespaces", output).group(1))  # type: ignore[union-attr]
        assert not devserver.port_free(ui_port)  # the UI is still up for the user
        api = re.search(r"HTTP API: (http://127\.0\.0\.1:(\d+))/docs +\(bearer key (\S+);", output)
        assert api is not None, output[-3000:]
        api_url, api_port, key = api.group(1), int(api.group(2)), api.group(3)
        paid = requests.get(f"{api_url}/v1/invoices/INV-DEMO-1001", timeout=10,
                            headers={"Authorization": f"Bearer {key}"})
        assert paid.status_code == 200 and paid.json()["state"] == "paid"
        assert requests.get(f"{api_url}/v1/invoices/INV-DEMO-1001", timeout=10).status_code == 401
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
        errors = process.stderr.read() if process.stderr else ""
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, errors[-2000:]
    deadline = time.monotonic() + 10
    while not devserver.port_free(ui_port) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert devserver.port_free(ui_port), "the embedded Temporal server outlived the demo"
    assert devserver.port_free(api_port), "the API outlived the demo"
    assert re.search(r"INV-DEMO-1001 +payment +accepted", output)
    assert re.search(r"INV-DEMO-1001 +state +paid", output)
    assert re.search(r"INV-DEMO-1002 +state +handed_off", output)
    assert re.search(r"INV-DEMO-1003 +communication sent +sms_reminder email", output)  # no phone
    assert re.search(r"INV-DEMO-1004 +communication skipped +friendly_reminder", output)  # late
    # two invoices of one customer: one message per step, both ledgers pointing to it
    assert re.search(r"INV-DEMO-100[25] +communication bundled +friendly_reminder email", output)
    assert re.search(r"INV-DEMO-100[25] +communication sent +sms_reminder sms +in one message with", output)
    assert (tmp_path / ".dunning" / "demo" / "dunning.db").exists()
