"""On a GPU the quantized module runs the Triton kernel and agrees with the reference."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _needs_cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")


@pytest.mark.parametrize(("bits", "group_size"), [(4, 128), (4, 64), (8, 128)])
def test_rtn_linear_module_on_cuda(bits, group_size, monkeypatch):
    from effllm_tools.methods.rtn.format import RTNLinear

    torch.manual_seed(0)
    lin = torch.nn.Linear(4096, 1024, bias=False)
    q = RTNLinear.from_linear(lin, bits, group_size, False, "float16").cuda()
    x = torch.randn(3, 7, 4096, device="cuda", dtype=torch.bfloat16)
    ref = torch.nn.functional.linear(x.double(), q.dequantized().double().cuda())
    monkeypatch.setenv("EFFLLM_KERNELS", "triton")
    out = q(x)
    assert q._prepared is not None  # the kernel path was taken and the prepared weight cached
    monkeypatch.setenv("EFFLLM_KERNELS", "reference")
    out_ref = q(x)
    err_kernel = (out.double() - ref).norm() / ref.norm()
    err_torch = (out_ref.double() - ref).norm() / ref.norm()
    assert torch.isfinite(out).all() and err_kernel <= 2 * err_torch + 1e-6


def test_quantized_tiny_model_generates_on_cuda(tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM

    import effllm_tools  # noqa: F401
    from tests.conftest import run_cli

    out = tmp_path / "q"
    assert run_cli("quantize", "--bits", "4", "--group-size", "32", str(tiny_llama), "-o", str(out),
                   "--device", "cuda").returncode == 0
    model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.bfloat16).cuda().eval()
    ids = torch.randint(0, 256, (1, 12), device="cuda")
    with torch.no_grad():
        kernel = model(ids).logits.float()
    cpu = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    with torch.no_grad():
        ref = cpu(ids.cpu()).logits
    assert (kernel.cpu() - ref).abs().max() < 0.05 * ref.abs().max()
    gen = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert gen.shape == (1, 20)
