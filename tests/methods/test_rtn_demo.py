"""rtn on the real demo model, through the CLI: the testbed's grid facts hold on a slice.

The demo weights come from a Q4_1 GGUF, so int4 asymmetric g32 is lossless by construction, and
g64 is not (research/testbed.md: 25.53 -> 33.1 on 40 x 512 tokens of Pride and Prejudice).
"""

from __future__ import annotations

import pytest

from tests.conftest import parse_json_stdout, run_cli

pytestmark = pytest.mark.slow

SLICE = ("--dataset", "austen-prideprejudice", "--seqlen", "512", "--max-tokens", "5120", "--dtype", "float32", "--json")


def test_rtn_int4_on_demo(tmp_path):
    base = parse_json_stdout(run_cli("eval-ppl", "demo", *SLICE, threads=1))["metrics"]["ppl"]
    ppl = {}
    for g in (32, 64):
        proc = run_cli("quantize", "--bits", "4", "--group-size", str(g), "demo", "-o", str(tmp_path / f"g{g}"), "--json",
                       threads=1)
        assert proc.returncode == 0, proc.stderr
        res = parse_json_stdout(proc)
        assert res["metrics"]["quantized_modules"] == 30 * 7
        ppl[g] = parse_json_stdout(run_cli("eval-ppl", res["output_dir"], *SLICE, threads=1))["metrics"]["ppl"]
    assert ppl[32] == pytest.approx(base, rel=2e-3)  # fp16 statistics: not bit-exact, but lossless in PPL
    assert 1.15 < ppl[64] / base < 1.6
    # Really packed: 4-bit codes take half a byte, so the checkpoint is far below the fp32 one.
    size = sum(p.stat().st_size for p in (tmp_path / "g64").glob("*.safetensors"))
    assert size < 200e6
