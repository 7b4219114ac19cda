"""Ctrl-C (exit 130) or SIGTERM (exit 143: `timeout`, a cancelled CI job) during a run: one line, no
output directory left behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO, make_tiny_llama


@pytest.mark.parametrize(("sig", "code", "word"), [(signal.SIGINT, 130, "interrupted"),
                                                    (signal.SIGTERM, 143, "terminated")])
def test_ctrl_c_or_sigterm_leaves_nothing(tmp_path, sample_text, sig, code, word):
    # A calibrated method on a model large enough that the stage runs for minutes on the CPU, so the
    # interrupt lands inside it even on a loaded machine.
    model = make_tiny_llama(tmp_path / "m", hidden=768, layers=12, vocab=2048)
    out = tmp_path / "o"
    proc = subprocess.Popen([sys.executable, "-X", "faulthandler", "-m", "effllm_cli.main", "quantize", "--method", "gptq", "--bits", "3",
                             "--group-size", "16", "--dataset", str(sample_text), "--nsamples", "64",
                             "--calib-seqlen", "128", str(model), "-o", str(out), "-v"], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"},
                            # A suite started in the background (`cmd &`) inherits SIGINT ignored, and
                            # Python then never raises KeyboardInterrupt: give the child the default back.
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    # Wait until the run is inside the stage (logged on stderr), then interrupt as a terminal would.
    seen = ""
    deadline = time.time() + 120
    while "stage 0" not in seen and time.time() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        seen += line
    proc.send_signal(sig)
    try:
        _, err = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:  # hung: SIGABRT makes faulthandler print every thread's stack
        proc.send_signal(signal.SIGABRT)
        _, err = proc.communicate(timeout=60)
        raise AssertionError(f"no exit 180 s after {sig!r}; log and stacks:\n{seen[-2000:]}\n{err[-6000:]}") from None
    assert proc.returncode == code, (proc.returncode, seen + err)
    assert word in err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".o")]
