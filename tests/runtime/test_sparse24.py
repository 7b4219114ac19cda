"""The 2:4 runtime: eligibility, modes, the load hook; on CUDA, converted models match the dense ones."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from effllm_tools.errors import BadInputError
from effllm_tools.runtime import sparse24
from tests.conftest import make_tiny_llama

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _prune24(w: torch.Tensor) -> torch.Tensor:
    g = w.reshape(w.shape[0], -1, 4)
    keep = g.abs().topk(2, dim=-1).indices
    return torch.zeros_like(g).scatter_(-1, keep, g.gather(-1, keep)).reshape_as(w)


def test_is_2of4_detects_the_pattern():
    w = _prune24(torch.randn(8, 16))
    assert sparse24.is_2of4(w)
    w[3, 5] = w[3, 4] = w[3, 6] = 1.0  # three non-zeros in one group
    assert not sparse24.is_2of4(w)
    assert not sparse24.is_2of4(torch.randn(4, 6))  # width not a multiple of 4


def test_modes_from_argument_and_environment(monkeypatch):
    monkeypatch.delenv("EFFLLM_SPARSE24", raising=False)
    assert sparse24.resolve_mode() == sparse24.AUTO_MODE
    monkeypatch.setenv("EFFLLM_SPARSE24", "force")
    assert sparse24.resolve_mode() == "on"
    assert sparse24.resolve_mode("off") == "off"  # the argument wins over the environment
    monkeypatch.setenv("EFFLLM_SPARSE24", "sometimes")
    with pytest.raises(BadInputError, match="EFFLLM_SPARSE24"):
        sparse24.resolve_mode()


def test_cpu_and_fp32_layers_are_left_dense_with_a_reason():
    lin = nn.Linear(64, 32)
    lin.weight.data = _prune24(lin.weight.data)
    assert "CUDA" in sparse24.ineligible_reason(lin, "cutlass")
    assert "not an nn.Linear" in sparse24.ineligible_reason(nn.LayerNorm(4), "cutlass")


def test_load_hook_reads_the_pattern_from_provenance(tmp_path):
    (tmp_path / "effllm_provenance.json").write_text(json.dumps(
        {"stages": [{"method": "wanda++", "metrics": {"sparsity_pattern": "2:4"}}, {"method": "rtn", "metrics": {}}]}))
    assert sparse24.checkpoint_pattern(tmp_path) == "2:4"
    assert sparse24.checkpoint_pattern(tmp_path / "none") is None
    model = nn.Sequential(nn.Linear(8, 8))
    assert sparse24.maybe_apply_sparse24(model, tmp_path, "cpu") is None  # CPU: never converted


def _pruned_checkpoint(tmp_path):
    """A tiny Llama with CUTLASS/cuSPARSELt-friendly widths, magnitude-pruned 2:4 through the CLI."""
    from tests.conftest import run_cli

    base = make_tiny_llama(tmp_path / "base", hidden=128, layers=2)
    out = tmp_path / "p24"
    proc = run_cli("prune", "--method", "magnitude", "--sparsity", "2:4", str(base), "-o", str(out), "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    return out


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["on", "dual"])
@pytest.mark.parametrize("backend", ["cutlass", "cusparselt"])
def test_converted_model_logits_match_dense(tmp_path, monkeypatch, mode, backend):
    if backend == "cusparselt" and not torch.backends.cusparselt.is_available():
        pytest.skip("PyTorch built without cuSPARSELt")
    if backend == "cutlass" and torch.cuda.get_device_capability()[0] != 8:
        pytest.skip("PyTorch's CUTLASS 2:4 kernels run on sm8x only")
    import effllm_tools
    from effllm_tools.io.load import load_model

    ckpt = _pruned_checkpoint(tmp_path)
    monkeypatch.setenv("EFFLLM_SPARSE24_BACKEND", backend)
    dense = load_model(str(ckpt), device="cuda", dtype="bfloat16", sparse24="off").model
    sparse = load_model(str(ckpt), device="cuda", dtype="bfloat16", sparse24=mode).model
    report = sparse._effllm_sparse24
    # CUTLASS needs columns in multiples of 64: down_proj (288 inputs) stays dense, with the reason.
    expected = 14 if backend == "cusparselt" else 12
    assert len(report.converted) == expected, report.summary()
    assert all("shape" in r and "down_proj" in n for n, r in report.skipped.items()), report.skipped
    assert not hasattr(dense, "_effllm_sparse24") or not dense._effllm_sparse24.converted
    q = sparse.model.layers[0].self_attn.q_proj
    w = q.weight_sparse if mode == "dual" else q.weight
    assert isinstance(w, torch.sparse.SparseSemiStructuredTensor)
    for length in (1, 5, 200):  # dual: the first two take the dense weight, the last the sparse one
        ids = torch.randint(0, 256, (1, length), device="cuda", generator=torch.Generator("cuda").manual_seed(length))
        with torch.no_grad():
            a, b = dense(ids).logits.float(), sparse(ids).logits.float()
        err = float((a - b).norm() / a.norm())
        assert err < 2e-2, (length, err)
    # effllm_tools.load honours EFFLLM_SPARSE24 as well.
    monkeypatch.setenv("EFFLLM_SPARSE24", "on")
    assert len(effllm_tools.load(ckpt, device="cuda", dtype="bfloat16")._effllm_sparse24.converted) == expected


@cuda
@pytest.mark.gpu
def test_fp32_and_non24_layers_are_logged_and_left_dense(tmp_path, caplog):
    lin = nn.Linear(128, 64).cuda()
    other = nn.Linear(128, 64).cuda().half()
    model = nn.ModuleDict({"a": lin, "b": other})
    with caplog.at_level("INFO", logger="effllm"):
        report = sparse24.apply_sparse24(model, mode="on")
    assert not report.converted and "float32" in report.skipped["a"] and "not 2:4" in report.skipped["b"]
    assert "left dense" in caplog.text
