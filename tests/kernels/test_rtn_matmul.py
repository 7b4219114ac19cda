"""The ``rtn`` dequantize-matmul: Triton kernels against the pure-torch reference.

Without a GPU the kernels run in Triton's interpreter (``conftest.py``) at tiny shapes; with one,
the same tests run on CUDA and the ``gpu`` tests add the real layer shapes. Tolerance (DESIGN.md,
Kernels): the kernel's error against an fp64 reference is at most twice the error of the same
math done by torch in the kernel's dtype; NaN never passes; outputs are poisoned before each run.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from effllm_kernels import dispatch
from effllm_kernels.packing import pack_codes, unpack_codes
from effllm_kernels.rtn import prepare_rtn_weight, rtn_linear, rtn_linear_reference
from effllm_kernels.rtn.prepare import field_float
from effllm_kernels.rtn.reference import dequantize

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@dataclass
class Case:
    """One random rtn layer and input (the stored format, as on disk)."""

    x: torch.Tensor
    packed: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    bias: torch.Tensor | None
    bits: int
    group_size: int

    @property
    def fmt(self) -> tuple:
        return self.packed, self.scales, self.zeros, self.bits, self.group_size, self.x.shape[-1]


def make_case(m: int, n: int, k: int, bits: int, g: int, dtype: torch.dtype, seed: int,
              bias: bool = True, device: torch.device = DEVICE) -> Case:
    """Random codes, positive scales and fractional zero points (floats in code units)."""
    gen = torch.Generator().manual_seed(seed)
    groups = -(-k // g)
    codes = torch.randint(0, 1 << bits, (n, k), generator=gen)
    scales = torch.rand(n, groups, generator=gen) * 0.02 + 0.005
    zeros = torch.rand(n, groups, generator=gen) * ((1 << bits) - 1)
    x = torch.randn(m, k, generator=gen)
    b = torch.randn(n, generator=gen) if bias else None
    return Case(
        x=x.to(device, dtype), packed=pack_codes(codes, bits).to(device), scales=scales.to(device, dtype),
        zeros=zeros.to(device, dtype), bias=None if b is None else b.to(device, dtype), bits=bits, group_size=g,
    )


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.double() - ref).norm() / ref.norm()).item()


def assert_close_to_reference(y: torch.Tensor, case: Case) -> None:
    """The DESIGN tolerance: kernel error <= 2x torch-in-dtype error, against an fp64 reference."""
    assert torch.isfinite(y).all(), "NaN/inf in the output (an unwritten element?)"
    p, s, z, bits, g, k = case.fmt
    b64 = None if case.bias is None else case.bias.double()
    ref = rtn_linear_reference(case.x.double(), p, s.double(), z.double(), bits, g, k, b64)
    torch_err = rel_err(rtn_linear_reference(case.x, *case.fmt, case.bias), ref)
    assert rel_err(y, ref) <= 2 * torch_err, (rel_err(y, ref), torch_err)


def run_kernel(case: Case, config=None) -> torch.Tensor:
    """The Triton kernel on ``case`` with the output poisoned (NaN) beforehand."""
    from effllm_kernels.rtn.launch import rtn_matmul_triton

    w = prepare_rtn_weight(*case.fmt)
    out = torch.full((case.x.shape[0], w.out_features), float("nan"), dtype=case.x.dtype, device=case.x.device)
    y = rtn_matmul_triton(case.x, w, case.bias, config, out=out)
    assert y.data_ptr() == out.data_ptr()
    return y


def _configs() -> list:
    from effllm_kernels.rtn.launch import KernelConfig

    return [
        KernelConfig("gemv", 1, 16, split_k=1, num_warps=1, num_stages=2),
        KernelConfig("gemv", 1, 32, split_k=2, num_warps=1, num_stages=2),  # N % 32 != 0, split K
        KernelConfig("mma", 16, 16, split_k=1, num_warps=4, num_stages=2),  # dequantize in fp32
        KernelConfig("mma", 16, 32, split_k=3, num_warps=4, num_stages=2, pair=True),  # 4-bit pairs
    ]


# (m, n, k, bits, group_size): ragged last groups (96/64, 576/128, 100/32, 80/16's chunk tail),
# K not a multiple of a chunk, N not a multiple of the block.
TINY = [
    (1, 16, 64, 4, 32),
    (3, 48, 96, 8, 64),
    (3, 48, 576, 4, 128),
    (2, 16, 100, 8, 32),
    (2, 16, 80, 4, 16),
]


@pytest.mark.parametrize("shape", TINY, ids=lambda s: "m{}n{}k{}b{}g{}".format(*s))
@pytest.mark.parametrize("config_index", range(4), ids=["gemv16", "gemv32split", "mma", "mma-pair-split"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_kernel_matches_reference_tiny(shape: tuple, config_index: int, dtype: torch.dtype) -> None:
    m, n, k, bits, g = shape
    case = make_case(m, n, k, bits, g, dtype, seed=hash((shape, config_index)) % 10_000, bias=config_index % 2 == 0)
    assert_close_to_reference(run_kernel(case, _configs()[config_index]), case)


def test_prepared_layout_decodes_to_the_stored_codes() -> None:
    """Decoding the prepared words by the documented mapping gives back every stored code."""
    for bits, g, k in [(4, 128, 576), (4, 16, 80), (8, 64, 100), (8, 32, 37 * 8)]:
        case = make_case(1, 8, k, bits, g, torch.float16, seed=k, device=torch.device("cpu"))
        w = prepare_rtn_weight(*case.fmt)
        kc, halves = w.chunk_words, 32 // bits // 4
        words = w.qweight.to(torch.int64).reshape(8, w.n_chunks, kc) & 0xFFFFFFFF
        decoded = torch.zeros(8, w.n_chunks * w.chunk_codes, dtype=torch.int64)
        for j in range(32 // bits):
            u, h = j % 4, j // 4
            field = (words >> (j * bits)) & ((1 << bits) - 1)  # [8, chunks, KC]
            for c in range(w.n_chunks):
                ks = c * w.chunk_codes + u * w.unit_span + torch.arange(kc) * halves + h
                decoded[:, ks] = field[:, c]
        assert torch.equal(decoded[:, :k], unpack_codes(case.packed, bits, k).to(torch.int64))
        assert not decoded[:, k:].any()  # padding codes are zero
        f0, fs = field_float(bits)
        gidx = torch.arange(k) // g
        cs, zcs = w.coefs[0][gidx].t(), w.coefs[1][gidx].t()  # [8, K]
        dense = (f0 + decoded[:, :k].double() * fs) * cs.double() - zcs.double()
        ref = dequantize(case.packed, case.scales.float(), case.zeros.float(), bits, g, k).double()
        assert torch.allclose(dense, ref, rtol=0, atol=1e-5 * ref.abs().max().item())


def test_rtn_linear_flattens_leading_dims_without_bias() -> None:
    case = make_case(6, 32, 128, 4, 64, torch.bfloat16, seed=3, bias=False)
    x3 = case.x.reshape(2, 3, 128)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(dispatch.ENV_VAR, "triton")  # the interpreter on the CPU
        y = rtn_linear(x3, *case.fmt, prepared=prepare_rtn_weight(*case.fmt))
    assert y.shape == (2, 3, 32) and y.dtype == torch.bfloat16
    assert_close_to_reference(y.reshape(6, 32), case)


def test_forced_triton_and_forced_reference_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    case = make_case(2, 48, 192, 8, 64, torch.float16, seed=7)
    monkeypatch.setenv(dispatch.ENV_VAR, "reference")
    y_ref = rtn_linear(case.x, *case.fmt, case.bias)
    assert torch.equal(y_ref, rtn_linear_reference(case.x, *case.fmt, case.bias))
    monkeypatch.setenv(dispatch.ENV_VAR, "triton")
    y_tri = rtn_linear(case.x, *case.fmt, case.bias, prepared=prepare_rtn_weight(*case.fmt))
    assert_close_to_reference(y_tri, case)
    assert rel_err(y_tri, y_ref.double()) < 2e-3


def test_auto_picks_the_reference_on_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(dispatch.ENV_VAR, "auto")
    case = make_case(3, 16, 64, 4, 32, torch.bfloat16, seed=11, device=torch.device("cpu"))
    assert dispatch.choose_backend("rtn_linear", case.x) == "reference"
    assert torch.equal(rtn_linear(case.x, *case.fmt, case.bias), rtn_linear_reference(case.x, *case.fmt, case.bias))
    if torch.cuda.is_available():
        assert dispatch.choose_backend("rtn_linear", case.x.cuda()) == "triton"
        assert dispatch.choose_backend("rtn_linear", case.x.cuda(), "bits=3") == "reference"


def test_auto_falls_back_for_unsupported_cases(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(dispatch.ENV_VAR, "auto")
    case = make_case(2, 16, 96, 3, 32, torch.float32, seed=5)  # 3-bit and fp32 activations
    assert torch.equal(rtn_linear(case.x, *case.fmt), rtn_linear_reference(case.x, *case.fmt))


def test_dispatch_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    case = make_case(1, 16, 64, 3, 32, torch.bfloat16, seed=1)
    monkeypatch.setenv(dispatch.ENV_VAR, "fastest")
    with pytest.raises(ValueError, match="EFFLLM_KERNELS"):
        rtn_linear(case.x, *case.fmt)
    monkeypatch.setenv(dispatch.ENV_VAR, "triton")
    with pytest.raises(dispatch.KernelUnavailableError, match="bits=3"):
        rtn_linear(case.x, *case.fmt)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(dispatch.KernelUnavailableError, match="TRITON_INTERPRET"):
        dispatch.choose_backend("rtn_linear", torch.zeros(1))


def test_prepared_weight_must_match_the_call() -> None:
    case = make_case(1, 16, 128, 4, 64, torch.bfloat16, seed=2)
    other = make_case(1, 16, 128, 4, 32, torch.bfloat16, seed=2)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(dispatch.ENV_VAR, "triton")
        with pytest.raises(ValueError, match="does not match"):
            rtn_linear(case.x, *case.fmt, prepared=prepare_rtn_weight(*other.fmt))


# Real layer shapes (N, K): Llama-3-8B's 4096x4096, up/gate 4096->14336 and down 14336->4096.
GPU_SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336)]


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("nk", GPU_SHAPES, ids=lambda s: f"n{s[0]}k{s[1]}")
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("g_dtype", [(128, torch.bfloat16), (64, torch.float16)], ids=["g128-bf16", "g64-fp16"])
def test_kernel_matches_reference_real_shapes(nk: tuple, bits: int, g_dtype: tuple) -> None:
    (n, k), (g, dtype) = nk, g_dtype
    for m in (1, 16, 128):  # the heuristic's config for each: GEMV, pair mma, fp32-dequant mma
        case = make_case(m, n, k, bits, g, dtype, seed=m + n + bits)
        assert_close_to_reference(run_kernel(case), case)


def test_split_k_counters_reset_between_calls() -> None:
    """The single-launch split-K leaves its arrival counters at zero: repeated calls agree exactly."""
    from effllm_kernels.rtn.launch import KernelConfig

    case = make_case(2, 48, 576, 4, 128, torch.bfloat16, seed=13)
    for cfg in (KernelConfig("gemv", 1, 16, split_k=3, num_warps=1, num_stages=2),
                KernelConfig("mma", 16, 16, split_k=2, num_warps=4, num_stages=2, pair=True)):
        first = run_kernel(case, cfg)
        assert_close_to_reference(first, case)
        assert torch.equal(run_kernel(case, cfg), first)


def test_large_tile_split_k_uses_the_reduce_kernel() -> None:
    """Tiles above LAST_REDUCES_MAX_TILE leave the split-K partials to the reduce kernel."""
    from effllm_kernels.rtn.launch import LAST_REDUCES_MAX_TILE, KernelConfig

    case = make_case(3, 80, 576, 8, 64, torch.float16, seed=17)
    cfg = KernelConfig("mma", 64, 128, split_k=3, num_warps=4, num_stages=2)
    assert cfg.block_m * cfg.block_n > LAST_REDUCES_MAX_TILE
    assert_close_to_reference(run_kernel(case, cfg), case)
