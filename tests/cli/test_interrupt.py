"""Ctrl-C during a run: exit 130, one line, no output directory left behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from tests.conftest import REPO, make_tiny_llama


def test_ctrl_c_leaves_nothing(tmp_path):
    # A model large enough that quantizing and writing take a few seconds on the CPU.
    model = make_tiny_llama(tmp_path / "m", hidden=768, layers=12, vocab=2048)
    out = tmp_path / "o"
    proc = subprocess.Popen([sys.executable, "-m", "effllm_cli.main", "quantize", "--bits", "3", "--group-size", "16",
                             str(model), "-o", str(out), "-v"], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    # Wait until the run is inside the stage (logged on stderr), then interrupt as a terminal would.
    seen = ""
    deadline = time.time() + 120
    while "stage 0" not in seen and time.time() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        seen += line
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, (proc.returncode, seen + err)
    assert "interrupted" in err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".o")]
