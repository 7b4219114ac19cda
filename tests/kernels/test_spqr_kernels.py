"""The ``spqr`` linear layer: Triton kernels against the pure-torch reference, dispatcher, custom op.

Without a GPU the kernels run in Triton's interpreter (``conftest.py``) at tiny shapes; with one, the
same tests run on CUDA and the ``gpu`` tests add the real layer shapes. Every case is a fresh random
:class:`SpqrTensors` (random codes, statistics codes and second-level stats, CSR outliers, act-order
permutation). Tolerance (DESIGN.md, Kernels): the kernel's error against an fp64 reference is at
most twice the error of torch doing the same math in the activation dtype (fp32: at most 1e-5, the
``cs * f - zcs`` decomposition cancelling a few bits); NaN never passes; outputs are poisoned.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from effllm_kernels import dispatch
from effllm_kernels.packing import packed_words, unpack_codes
from effllm_kernels.spqr import (
    SpqrKernelTensors,
    SpqrTensors,
    repack,
    spqr_linear,
    spqr_linear_op,
    spqr_linear_reference,
    unpack,
)
from effllm_kernels.spqr.op import op_args, op_meta
from effllm_kernels.spqr.repack import PAIRED_BITS, paired_position
from effllm_kernels.spqr.testing import random_spqr_tensors

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.double() - ref).norm() / ref.norm()).item()


def assert_close_to_reference(y: torch.Tensor, x: torch.Tensor, t: SpqrTensors, bias=None) -> None:
    assert torch.isfinite(y).all(), "NaN/inf in the output (an unwritten element?)"
    ref = spqr_linear_reference(x.double(), t, None if bias is None else bias.double())
    torch_err = rel_err(spqr_linear_reference(x, t, bias), ref)
    bound = 1e-5 if x.dtype == torch.float32 else 2 * torch_err
    assert rel_err(y, ref) <= bound, (rel_err(y, ref), torch_err)


def run_kernel(x: torch.Tensor, t: SpqrTensors | SpqrKernelTensors, bias=None, config=None) -> torch.Tensor:
    """The Triton kernel with the output poisoned (NaN) beforehand."""
    from effllm_kernels.spqr.launch import spqr_matmul_triton

    out = torch.full((x.shape[0], t.out_features), float("nan"), dtype=x.dtype, device=x.device)
    y = spqr_matmul_triton(x, t, bias, config, out=out)
    assert y.data_ptr() == out.data_ptr()
    return y


def _configs() -> list:
    from effllm_kernels.spqr.launch import KernelConfig

    return [
        KernelConfig("gemv", 1, 16, 2, split_k=1, num_warps=1),
        KernelConfig("gemv", 1, 32, 1, split_k=3, num_warps=2, host_perm=True),  # N % 32 != 0, split K
        KernelConfig("mma", 16, 16, 1, split_k=1, num_warps=4),  # stat block == tile rows
        KernelConfig("mma", 16, 32, 2, split_k=2, num_warps=4),  # tile rows span two stat blocks
        KernelConfig("dequant", 1, 16, 2, num_warps=4),  # W_s written densely, then one torch matmul
    ]


# (m, n, k, bits, group_size, stat_bits, stat_group): the 3/3/16/16 format, 2- and 4-bit, 5-bit
# codes straddling words, fp16 statistics, groups of 64 and 8, ragged last group (K=544 with
# g=64 and K=100 with g=16), K not a multiple of 32 (a padded last unit), a ragged last step,
# N not a multiple of the tile.
TINY = [
    (1, 48, 352, 3, 16, 3, 16),
    (3, 40, 544, 4, 64, 16, 16),
    (2, 32, 100, 5, 16, 3, 16),
    (2, 16, 320, 2, 8, 4, 8),
]
DTYPES = [torch.bfloat16, torch.float16, torch.float32]


@pytest.mark.parametrize("shape", TINY, ids=lambda s: "m{}n{}k{}b{}g{}s{}sg{}".format(*s))
@pytest.mark.parametrize("config_index", range(5),
                         ids=["gemv", "gemv-split-hostperm", "mma", "mma-split", "dequant"])
def test_kernel_matches_reference_tiny(shape: tuple, config_index: int) -> None:
    """Every path on every format, on the repacked layer; the dtype rotates over the cases (test time)."""
    m, n, k, bits, g, sb, sg = shape
    dtype = DTYPES[(TINY.index(shape) + config_index) % 3]
    seed = hash((shape, config_index)) % 10_000
    t = random_spqr_tensors(n, k, bits, g, sb, sg, outlier_density=0.03, permute=seed % 3 != 0, seed=seed,
                            device=DEVICE)
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    x = torch.randn(m, k, generator=gen, device=DEVICE).to(dtype)
    bias = torch.randn(n, generator=gen, device=DEVICE).to(dtype) if config_index % 2 == 0 else None
    assert_close_to_reference(run_kernel(x, repack(t), bias, _configs()[config_index]), x, t, bias)


@pytest.mark.parametrize("shape", TINY, ids=lambda s: "n{1}k{2}b{3}g{4}s{5}sg{6}".format(*s))
def test_dequantize_kernel_gives_the_stored_weights(shape: tuple) -> None:
    """The large-batch path's dense W_s (fp32) is the reference's dequantization: codes, statistics and
    outliers, every format of TINY."""
    from effllm_kernels.spqr import dequantize_stored
    from effllm_kernels.spqr.launch import dequantize_triton

    _, n, k, bits, g, sb, sg = shape
    t = random_spqr_tensors(n, k, bits, g, sb, sg, outlier_density=0.05, seed=bits * 7 + g, device=DEVICE)
    ref = dequantize_stored(t)
    w = dequantize_triton(repack(t), torch.float32)
    assert w.shape == (n, k) and torch.allclose(w, ref, rtol=1e-5, atol=1e-6), (w - ref).abs().max()


def test_dequantize_path_without_bias_with_leading_dims_and_grad_enabled(monkeypatch: pytest.MonkeyPatch) -> None:
    """The heuristic's path at M >= DEQUANT_MIN_M through the dispatcher: no bias (torch.mm), a 3-D x,
    an x that requires grad (the result carries no graph, as on the fused paths)."""
    from effllm_kernels.spqr.launch import DEQUANT_MIN_M

    t = random_spqr_tensors(24, 96, 3, 16, 3, 16, outlier_density=0.05, seed=31, device=DEVICE)
    x = torch.randn(2, DEQUANT_MIN_M, 96, device=DEVICE, requires_grad=True)
    monkeypatch.setenv(dispatch.ENV_VAR, "triton")
    y = spqr_linear(x, repack(t))
    assert y.shape == (2, DEQUANT_MIN_M, 24) and not y.requires_grad
    assert_close_to_reference(y.reshape(-1, 24), x.detach().reshape(-1, 96), t)


def test_large_batches_take_the_dequantize_path() -> None:
    from effllm_kernels.spqr.launch import DEQUANT_MIN_M, pick_config

    t = random_spqr_tensors(64, 256, seed=3)
    for dtype in DTYPES:
        assert pick_config(DEQUANT_MIN_M, t, torch.device("cpu"), dtype).path == "dequant"
        assert pick_config(DEQUANT_MIN_M - 1, t, torch.device("cpu"), dtype).path != "dequant"


# The fp16x2 GEMV (2-4 bits, groups of 16, bf16 activations): (m, n, k, bits, stat_bits, stat_group,
# permute, outlier density, config): every bit width, quantized and fp16 statistics, blocks of 8 and
# 16 rows, a ragged K (a padded last unit, an odd number of groups), N not a multiple of the tile,
# K split, prefetch 0, 1 and 2 steps ahead, outliers before the K loop, an unrolled K loop, the permutation gathered in the kernel and on the host, no outliers.
def _gemv16_cases() -> list:
    from effllm_kernels.spqr.launch import KernelConfig

    return [
        (1, 48, 352, 3, 3, 16, True, 0.03, KernelConfig("gemv16", 1, 16, 2, 1, 1, 1)),
        (2, 40, 100, 2, 3, 16, False, 0.0, KernelConfig("gemv16", 1, 32, 1, 3, 2, 1, prefetch=0)),
        (1, 24, 200, 4, 16, 16, True, 0.03, KernelConfig("gemv16", 1, 16, 2, 2, 1, 1, host_perm=True, prefetch=2)),
        (3, 36, 544, 3, 4, 8, True, 0.02, KernelConfig("gemv16", 1, 32, 2, 2, 2, 1, outliers_first=True)),
        (1, 64, 1056, 3, 3, 16, True, 0.01, KernelConfig("gemv16", 1, 64, 4, 3, 2, 1, prefetch=2, unroll=2)),
        (1, 20, 64, 4, 2, 16, False, 0.05, KernelConfig("gemv16", 1, 16, 1, 1, 1, 1, prefetch=0)),
    ]


@pytest.mark.parametrize("case", range(6))
def test_fp16x2_gemv_matches_reference(case: int) -> None:
    m, n, k, bits, sb, sg, permute, density, cfg = _gemv16_cases()[case]
    t = random_spqr_tensors(n, k, bits, 16, sb, sg, outlier_density=density, permute=permute, seed=100 + case,
                            device=DEVICE)
    gen = torch.Generator(device=DEVICE).manual_seed(case)
    x = torch.randn(m, k, generator=gen, device=DEVICE).bfloat16()
    bias = torch.randn(n, generator=gen, device=DEVICE).bfloat16() if case % 2 else None
    assert_close_to_reference(run_kernel(x, repack(t), bias, cfg), x, t, bias)


def test_fp16x2_gemv_is_the_default_for_bf16_decode_only() -> None:
    from effllm_kernels.spqr.launch import gemv16_unsupported_reason, pick_config

    t = random_spqr_tensors(64, 256, seed=1, device="cpu")
    assert pick_config(1, t, torch.device("cpu"), torch.bfloat16).path == "gemv16"
    assert pick_config(1, t, torch.device("cpu"), torch.float16).path == "gemv"
    assert pick_config(16, t, torch.device("cpu"), torch.bfloat16).path == "mma16"
    assert "groups of 64" in gemv16_unsupported_reason(torch.bfloat16, random_spqr_tensors(16, 128, 4, 64, seed=2))
    assert "5-bit" in gemv16_unsupported_reason(torch.bfloat16, random_spqr_tensors(16, 128, 5, 16, seed=2))


# The fp16 tensor-core kernel (2-4 bits, groups of 16, fp16 / bf16 activations): (m, n, k, bits, stat_bits,
# stat_group, permute, outlier density, config, dtype): every bit width (pair orders), quantized and fp16
# statistics, blocks of 8 rows, ragged K and M, N not a multiple of the tile, K split, prefetch 0 and 1,
# x cast to fp16 in the kernel and on the host.
def _mma16_cases() -> list:
    from effllm_kernels.spqr.launch import KernelConfig

    return [
        (16, 48, 352, 3, 3, 16, True, 0.03, KernelConfig("mma16", 16, 16, 2, 1, 4, 1, rows=4), torch.bfloat16),
        (5, 40, 100, 2, 3, 16, False, 0.0, KernelConfig("mma16", 16, 32, 1, 3, 4, 1, prefetch=0), torch.float16),
        (17, 24, 200, 4, 16, 16, True, 0.03, KernelConfig("mma16", 16, 16, 2, 2, 4, 1, rows=2, host_cast=True), torch.bfloat16),
        (3, 36, 544, 3, 4, 8, True, 0.02, KernelConfig("mma16", 16, 32, 2, 2, 4, 1, rows=4), torch.float16),
        (24, 40, 200, 3, 3, 16, True, 0.03, KernelConfig("mma16", 32, 16, 2, 2, 4, 1, rows=4, host_cast=True),
         torch.bfloat16),  # a tile of 32 activation rows (the heuristic's for M = 17..32)
    ]


@pytest.mark.parametrize("case", range(5))
def test_fp16_mma_matches_reference(case: int) -> None:
    m, n, k, bits, sb, sg, permute, density, cfg, dtype = _mma16_cases()[case]
    t = random_spqr_tensors(n, k, bits, 16, sb, sg, outlier_density=density, permute=permute, seed=200 + case,
                            device=DEVICE)
    gen = torch.Generator(device=DEVICE).manual_seed(case)
    x = torch.randn(m, k, generator=gen, device=DEVICE).to(dtype)
    bias = torch.randn(n, generator=gen, device=DEVICE).to(dtype) if case % 2 else None
    assert_close_to_reference(run_kernel(x, repack(t), bias, cfg), x, t, bias)


def test_fp16_mma_is_the_default_above_the_gemv_for_16bit_activations() -> None:
    from effllm_kernels.spqr.launch import (
        DEQUANT_MIN_M,
        GEMV_MAX_M,
        KernelConfig,
        mma16_unsupported_reason,
        pick_config,
    )

    t = random_spqr_tensors(64, 256, seed=1, device="cpu")
    cpu = torch.device("cpu")
    for m, bm in ((GEMV_MAX_M + 1, 16), (16, 16), (33, 64), (DEQUANT_MIN_M - 1, 64)):
        for dtype in (torch.bfloat16, torch.float16):
            cfg = pick_config(m, t, cpu, dtype)
            assert (cfg.path, cfg.block_m, cfg.host_cast) == ("mma16", bm, True), (m, dtype, cfg)
        assert pick_config(m, t, cpu, torch.float32).path == "mma"  # fp32 activations: the older kernel
    assert pick_config(16, random_spqr_tensors(64, 256, 3, 32, seed=2), cpu, torch.bfloat16).path == "mma"
    assert mma16_unsupported_reason(torch.bfloat16, t) is None
    assert mma16_unsupported_reason(torch.float16, t) is None
    assert "float32" in mma16_unsupported_reason(torch.float32, t)
    assert "block_m" in mma16_unsupported_reason(torch.bfloat16, t, block_m=8)
    with pytest.raises(ValueError, match="fp16 tensor-core"):
        run_kernel(torch.randn(4, 256), repack(t), None, KernelConfig("mma16", 16, 16, 2))


def test_decode_asm_emulation_gives_the_weights() -> None:
    """The PTX block of the fp16 tensor-core kernel (emulated instruction by instruction, fp16 rounding
    included) gives s * (q - z) for the 32 codes of a unit of random codes, in pair order."""
    import numpy as np

    from effllm_kernels.packing import pack_codes
    from effllm_kernels.spqr.pair_asm import decode_asm, emulate_decode, pair_layout
    from effllm_kernels.spqr.repack import repack_qweight

    rng = np.random.default_rng(1)
    for bits in (2, 3, 4):
        asm, cons = decode_asm(bits)
        assert cons.count("=h") == 32 and cons.count("r") == 8
        layout = pair_layout(bits)
        for _ in range(10):
            codes = torch.from_numpy(rng.integers(0, 2**bits, (1, 32)))
            words = repack_qweight(pack_codes(codes, bits), 32, bits)[:, 0].tolist()
            s = rng.uniform(0.5, 2.0, 2).astype(np.float32)
            z = rng.uniform(0, 2**bits - 1, 2).astype(np.float32)
            nb = -s * (z - 2 ** (bits - 1))
            stats = [int(np.float32(v).view(np.uint32)) for v in (s[0], nb[0], s[1], nb[1])]
            got = emulate_decode(asm, (words + words[:1] * 4)[:4] + stats)
            q = codes[0].numpy()
            want = [float(s[c // 16] * (q[c] - z[c // 16])) for a, b, _, _ in layout for c in (a, b)]
            assert np.allclose(got, want, rtol=2e-3, atol=4e-3), (bits, got, want)


def test_pair_asm_emulation_matches_the_group_dots() -> None:
    """The PTX block the fp16x2 GEMV runs (emulated instruction by instruction, fp16 rounding included)
    gives each group's sum (q - 2**(bits-1)) * x on the kernel layout of random codes."""
    import numpy as np

    from effllm_kernels.packing import pack_codes
    from effllm_kernels.spqr.pair_asm import dot_asm, emulate, pair_layout
    from effllm_kernels.spqr.repack import repack_qweight

    rng = np.random.default_rng(0)
    for bits in (2, 3, 4):
        asm, cons = dot_asm(bits)
        assert cons.count("r") == 22
        layout = pair_layout(bits)
        assert sorted(c for a, b, _, _ in layout for c in (a, b)) == list(range(32))
        for _ in range(10):
            codes = torch.from_numpy(rng.integers(0, 2**bits, (1, 32)))
            words = repack_qweight(pack_codes(codes, bits), 32, bits)[:, 0].tolist()
            x = rng.standard_normal(32).astype(np.float16)
            bits16 = x.view(np.uint16).astype(np.int64)
            pairs = [int(bits16[a]) | int(bits16[b]) << 16 for a, b, _, _ in layout]
            got = emulate(asm, [0, 0] + (words + words[:1] * 4)[:4] + pairs)
            q = codes[0].numpy() - 2 ** (bits - 1)
            want = [float((q[16 * g:16 * g + 16] * x[16 * g:16 * g + 16].astype(np.float64)).sum()) for g in (0, 1)]
            assert np.allclose(got, want, rtol=1e-2, atol=2e-2), (bits, got, want)


@pytest.mark.parametrize("shape", TINY, ids=lambda s: "n{1}k{2}b{3}g{4}s{5}sg{6}".format(*s))
@pytest.mark.parametrize("permute", [True, False])
def test_repack_unpack_is_bit_exact_and_does_not_grow(shape: tuple, permute: bool) -> None:
    """repack -> unpack gives back every stored tensor bit for bit; the repacked layer is no larger
    (up to the zero padding of a ragged last 32-code unit) and the stored layer is left untouched."""
    _, n, k, bits, g, sb, sg = shape
    t = random_spqr_tensors(n, k, bits, g, sb, sg, outlier_density=0.05, permute=permute, seed=n + k, device=DEVICE)
    before = {name: v.clone() for name, v in t.tensors().items()}
    kt = repack(t)
    back = unpack(kt)
    back.validate()
    assert back.meta() == t.meta() and set(back.tensors()) == set(before)
    for name, v in before.items():
        assert torch.equal(back.tensors()[name], v) and back.tensors()[name].dtype == v.dtype, name
        assert torch.equal(t.tensors()[name], v), name
    padding = (-(-k // 32) * bits - packed_words(k, bits)) * n * 4
    assert kt.storage_bytes() == t.storage_bytes() + padding and padding <= (bits - 1) * n * 4
    assert kt.average_bits() == t.average_bits()
    # the layout really changed (a plain copy would pass the round trip too): rows are contiguous
    assert tuple(kt.qweight.shape) == (-(-k // 32) * bits, n)
    if bits not in PAIRED_BITS:
        assert torch.equal(kt.qweight[0], t.qweight[:, 0])
    else:  # and each code sits where paired_position says
        words = kt.qweight.t().reshape(n, -1, bits).to(torch.int64) & 0xFFFFFFFF  # [n, unit, word]
        codes = unpack_codes(t.qweight, bits, k)
        for j in (0, 1, 9, 17, 29, 30, 31):
            got = sum(((words[:, :, w] >> pos) & 1) << b for b, (w, pos) in enumerate(
                paired_position(j, b) for b in range(bits)))
            want = torch.nn.functional.pad(codes, (0, words.shape[1] * 32 - k)).reshape(n, -1, 32)[:, :, j]
            assert torch.equal(got, want.to(torch.int64)), j


def test_repacked_kernel_matches_stored_kernel_bit_for_bit() -> None:
    """The kernel on a repacked layer and on the stored one (repacked per call) give the same bytes."""
    t = random_spqr_tensors(64, 256, seed=11, device=DEVICE)
    x = torch.randn(1, 256, device=DEVICE).bfloat16()
    assert torch.equal(run_kernel(x, repack(t)), run_kernel(x, t))


def test_outliers_and_permutation_change_the_result() -> None:
    """The kernel reads the outliers and the permutation: dropping either changes y by far more than rounding."""
    t = random_spqr_tensors(32, 256, outlier_density=0.05, seed=3, device=DEVICE)
    x = torch.randn(1, 256, device=DEVICE)
    y = run_kernel(x, t)
    plain = SpqrTensors(**{**t.__dict__, "perm": None})
    no_out = SpqrTensors(**{**t.__dict__, "outlier_rowptr": torch.zeros_like(t.outlier_rowptr),
                            "outlier_col": t.outlier_col[:0], "outlier_val": t.outlier_val[:0]})
    for other in (plain, no_out):
        y_other = run_kernel(x, other)
        assert_close_to_reference(y_other, x, other)
        assert rel_err(y_other, y.double()) > 1e-3


def test_spqr_linear_flattens_leading_dims(monkeypatch: pytest.MonkeyPatch) -> None:
    t = random_spqr_tensors(16, 96, seed=4, device=DEVICE)
    x = torch.randn(2, 3, 96, device=DEVICE).half()
    monkeypatch.setenv(dispatch.ENV_VAR, "triton")  # the interpreter on the CPU
    y = spqr_linear(x, t)
    assert y.shape == (2, 3, 16) and y.dtype == torch.float16
    assert_close_to_reference(y.reshape(6, 16), x.reshape(6, 96), t)


def test_forced_reference_and_auto_on_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    t = random_spqr_tensors(16, 64, seed=5, device="cpu")
    x = torch.randn(3, 64).bfloat16()
    for mode in ("reference", "auto"):
        monkeypatch.setenv(dispatch.ENV_VAR, mode)
        assert dispatch.choose_backend("spqr_linear", x) == "reference"
        assert torch.equal(spqr_linear(x, t), spqr_linear_reference(x, t))
        assert torch.equal(spqr_linear(x, repack(t)), spqr_linear_reference(x, t))  # unpacked for the reference
    if torch.cuda.is_available():
        assert dispatch.choose_backend("spqr_linear", x.cuda()) == "triton"


def test_unsupported_cases_fall_back_or_raise(monkeypatch: pytest.MonkeyPatch) -> None:
    t = random_spqr_tensors(16, 96, group_size=48, seed=6, device=DEVICE)  # 48: not a divisor/multiple of 32
    x = torch.randn(2, 96, device=DEVICE)
    monkeypatch.setenv(dispatch.ENV_VAR, "auto")
    assert torch.equal(spqr_linear(x, t), spqr_linear_reference(x, t))
    monkeypatch.setenv(dispatch.ENV_VAR, "triton")
    with pytest.raises(dispatch.KernelUnavailableError, match="group_size=48"):
        spqr_linear(x, t)
    with pytest.raises(dispatch.KernelUnavailableError, match="group_size=48"):
        spqr_linear(x, repack(t))
    with pytest.raises(dispatch.KernelUnavailableError, match="float64"):
        spqr_linear(x.double(), random_spqr_tensors(16, 96, seed=6, device=DEVICE))


def test_custom_op_traces_and_matches(monkeypatch: pytest.MonkeyPatch) -> None:
    """The op has a working fake implementation: torch.compile(fullgraph=True) traces spqr_linear."""
    monkeypatch.setenv(dispatch.ENV_VAR, "reference")
    t = random_spqr_tensors(16, 64, seed=7, device="cpu")
    x = torch.randn(2, 64)
    for layer in (t, repack(t)):
        torch.library.opcheck(spqr_linear_op, (x, *op_args(layer), None, op_meta(layer)),
                              test_utils=("test_schema", "test_faketensor"))
        compiled = torch.compile(lambda a, layer=layer: spqr_linear(a, layer), backend="aot_eager", fullgraph=True)
        assert torch.equal(compiled(x), spqr_linear_reference(x, t))


# Real layer shapes (N, K): Llama-3-8B's 4096x4096, up/gate 4096->14336 and down 14336->4096.
GPU_SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336)]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: "{}x{}".format(*s))
@pytest.mark.parametrize("m", [1, 16, 64, 300])
def test_real_shapes_on_gpu(shape: tuple, m: int) -> None:
    """The heuristic's path at each M (M = 300: the dense W_s and cuBLAS) on the real shapes."""
    n, k = shape
    formats = [(3, 3, torch.bfloat16), (4, 16, torch.float16)]
    if m == 1:  # the fp16x2 GEMV on every bit width it takes, and the fp32 GEMV on 3 bits
        formats += [(4, 3, torch.bfloat16), (2, 3, torch.bfloat16), (3, 3, torch.float16)]
    for bits, sb, dtype in formats:
        t = random_spqr_tensors(n, k, bits, 16, sb, 16, outlier_density=0.01, seed=n + k + m, device="cuda")
        x = torch.randn(m, k, device="cuda").to(dtype)
        assert_close_to_reference(run_kernel(x, repack(t)), x, t)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: "{}x{}".format(*s))
@pytest.mark.parametrize("m", [2, 16, 24, 64])
def test_fp16_mma_real_shapes_on_gpu(shape: tuple, m: int) -> None:
    """The fp16 tensor-core kernel (the default above M = 3) at the real shapes: 2/3/4 bits, fp16 and bf16,
    x cast in the kernel (M = 16) and on the host (M = 2, 24, 64), tiles of 16, 32 and 64 activation rows."""
    from effllm_kernels.spqr.launch import KernelConfig, with_split

    n, k = shape
    for bits, sb, dtype in [(3, 3, torch.bfloat16), (4, 16, torch.float16), (2, 3, torch.bfloat16)]:
        t = random_spqr_tensors(n, k, bits, 16, sb, 16, outlier_density=0.01, seed=n + k + m, device="cuda")
        x = torch.randn(m, k, device="cuda").to(dtype)
        bm = 16 if m <= 16 else 32 if m <= 32 else 64
        cfg = with_split(KernelConfig("mma16", bm, 128, 2, 1, 4, 1, host_cast=m != 16), m, t, x.device)
        assert_close_to_reference(run_kernel(x, repack(t), None, cfg), x, t)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_replay_and_compile_on_gpu() -> None:
    t = repack(random_spqr_tensors(4096, 4096, seed=9, device="cuda"))
    x = torch.randn(1, 4096, device="cuda").bfloat16()
    y0 = spqr_linear(x, t)  # warm-up outside capture (compilation, split-K scratch)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = spqr_linear(x, t)
    x.copy_(torch.randn(1, 4096, device="cuda"))
    graph.replay()
    assert_close_to_reference(y, x, unpack(t))
    compiled = torch.compile(lambda a: spqr_linear(a, t), fullgraph=True, mode="reduce-overhead")
    for _ in range(3):
        out = compiled(x)
    assert torch.equal(out, spqr_linear(x, t)) and not torch.equal(out, y0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("n,k,m", [(14336, 4096, 1), (4096, 4096, 64)])
def test_compiled_decode_step_without_eager_warmup_on_gpu(n: int, k: int, m: int) -> None:
    """A call first seen inside torch.compile's CUDA-graph warm-up (a compiled decode step, batch 1 or
    64) must not allocate there (cudagraph trees reject tensors left in their pool): the repack
    reserved the activation scratch and the split-K workspace at load time."""
    from effllm_kernels import splitk
    from effllm_kernels.spqr import scratch

    scratch.clear()
    splitk.SCRATCH.ws.clear()
    splitk.SCRATCH.cnt.clear()
    t = repack(random_spqr_tensors(n, k, seed=13, device="cuda"))
    x = torch.randn(m, k, device="cuda").bfloat16()
    compiled = torch.compile(lambda a: spqr_linear(a, t), fullgraph=True, mode="reduce-overhead")
    for _ in range(3):
        out = compiled(x)
    assert_close_to_reference(out.clone(), x, unpack(t))


@pytest.mark.parametrize("sms", [4, 132])
@pytest.mark.parametrize("cuda", [False, True])
def test_load_time_reservation_covers_every_batch_size(sms: int, cuda: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """launch.split_k_need (what scratch.reserve allocates when a layer is repacked) is at least the
    workspace and the counters of the heuristic's launch at every M and activation dtype (with the CUDA
    GEMV available, as on a GPU without the interpreter, or not)."""
    from effllm_kernels.spqr import cuda_gemv, cuda_mma, launch

    monkeypatch.setattr(launch, "_sm_count", lambda device: sms)
    if cuda:
        monkeypatch.setattr(launch, "cuda_unsupported_reason", lambda dtype, t, device, mma_m=None: (
            cuda_gemv.unsupported_reason(dtype, t) if mma_m is None else cuda_mma.unsupported_reason(dtype, t, mma_m)))
    launch._cached_config.cache_clear()
    launch._split_k_need.cache_clear()
    try:
        for n, k, bits, sg in ((4096, 4096, 3, 16), (14336, 4096, 3, 16), (4096, 14336, 4, 16), (1024, 4096, 2, 16),
                               (40, 200, 3, 8), (4096, 4096, 5, 16)):
            meta = random_spqr_tensors(16, 64, bits, 16, 3, sg, seed=1).meta() | {"in_features": k, "out_features": n}
            ws, tiles = launch.split_k_need(meta, torch.device("cuda"))
            t = SimpleNamespace(**meta)
            for dtype in (torch.bfloat16, torch.float16, torch.float32):
                m, last_split = 0, 2
                while m < 64 or last_split > 1:  # every M until the programs alone fill the GPU
                    m += 1
                    cfg = launch.pick_config(m, t, torch.device("cuda"), dtype)
                    if cfg.path in ("cuda", "cuda_mma"):  # (with a GPU) a CUDA kernel, then the Triton one it falls back to
                        cws, ccnt = (cuda_gemv.scratch_need(t, m, cfg.cuda, sms) if cfg.path == "cuda"
                                     else cuda_mma.scratch_need(t, m, cfg.cuda_mma, sms))
                        assert cws <= ws and ccnt <= tiles, (n, k, bits, m, dtype, cfg)
                        cfg = launch.pick_config(m, t, torch.device("cuda"), dtype, cuda=False)
                    _, last_split, n_blocks, m_blocks = launch._grid(cfg, m, k, n)
                    if last_split > 1:
                        assert m * n * last_split <= ws and n_blocks * m_blocks <= tiles, (n, k, bits, m, dtype, cfg)
    finally:
        launch._cached_config.cache_clear()
        launch._split_k_need.cache_clear()


def test_module_repacks_in_place_and_still_saves_the_stored_format(monkeypatch: pytest.MonkeyPatch) -> None:
    """SpQRLinear's load-time repack: same buffer bytes (no second copy), a state dict bit-identical to
    the stored layer, the same outputs, and a stored state dict loads back into a repacked module."""
    from effllm_tools.methods.spqr.format import SpQRLinear

    t = random_spqr_tensors(48, 352, seed=12, device="cpu")
    bias = torch.randn(48)
    mod = SpQRLinear.from_tensors(t, bias)
    stored = {k: v.clone() for k, v in mod.state_dict().items()}
    nbytes = sum(b.numel() * b.element_size() for b in mod.buffers())
    mod.repack_for_kernels()
    assert mod.kernel_layout and isinstance(mod.layer(), SpqrKernelTensors)
    assert sum(b.numel() * b.element_size() for b in mod.buffers()) == nbytes
    assert not torch.equal(mod.qweight.flatten()[:64], t.qweight.flatten()[:64])  # the layout did change
    saved = mod.state_dict()
    assert saved.keys() == stored.keys()
    for k, v in stored.items():
        assert torch.equal(saved[k], v) and saved[k].dtype == v.dtype and saved[k].shape == v.shape, k
    x = torch.randn(2, 352)
    want = spqr_linear_reference(x, t, bias)
    monkeypatch.setenv(dispatch.ENV_VAR, "reference")
    assert torch.equal(mod(x), want)
    if os.environ.get("TRITON_INTERPRET") == "1":  # with a GPU, Triton cannot run on these CPU buffers
        monkeypatch.setenv(dispatch.ENV_VAR, "triton")  # the interpreter, on the repacked buffers
        assert_close_to_reference(mod(x.bfloat16()), x.bfloat16(), t, bias.bfloat16())
    fresh = SpQRLinear.from_tensors(t, torch.zeros(48))
    fresh.repack_for_kernels()
    fresh.qweight.zero_()
    fresh.load_state_dict(stored)
    assert not fresh.kernel_layout and torch.equal(fresh.dequantized(), mod.dequantized())


# --- the CUDA GEMV (effllm_kernels/spqr/cuda_gemv.py): its bucketed outliers and tables on the CPU, the
# kernel itself against the fp64 reference on a GPU

@pytest.mark.parametrize("n,k,density,seed", [(300, 1100, 0.05, 3), (128, 512, 0.0, 4), (4, 2000, 0.3, 5),
                                              (1000, 96, 0.02, 6)])
def test_bucketed_outliers_are_the_csr_outliers_rearranged(n: int, k: int, density: float, seed: int) -> None:
    """outlier_buckets holds every outlier once, in its (tile, bucket, row) slot, with its column and
    value, row pointers monotone and complete (ragged tiles and buckets, empty rows, no outliers)."""
    from effllm_kernels.spqr.cuda_gemv import BUCKET, ROWS, outlier_buckets

    t = random_spqr_tensors(n, k, outlier_density=density, seed=seed)
    buf = outlier_buckets(t)
    tiles, buckets = -(-n // ROWS), -(-k // BUCKET)
    nb = tiles * buckets * ROWS + 1
    assert buf.dtype == torch.int32 and buf.numel() == nb + t.nnz
    bptr, ent = buf[:nb].long(), buf[nb:].long() & 0xFFFFFFFF
    assert bptr[0] == 0 and bptr[-1] == t.nnz and bool((bptr[1:] >= bptr[:-1]).all())
    slot = torch.repeat_interleave(torch.arange(nb - 1), bptr[1:] - bptr[:-1])  # (tile, bucket, row) of each entry
    rows = (slot // (buckets * ROWS)) * ROWS + slot % ROWS
    cols = ((slot // ROWS) % buckets) * BUCKET + (ent & 0xFFFF)
    vals = (ent >> 16).to(torch.int32).to(torch.int16).view(torch.float16)
    got = torch.zeros(n, k, dtype=torch.float64).index_put_((rows, cols), vals.double(), accumulate=True)
    from effllm_kernels.spqr.reference import outlier_matrix

    assert torch.equal(got, outlier_matrix(t).double())
    assert bool((rows < n).all()) and len(set((rows * k + cols).tolist())) == t.nnz


def test_cuda_gemv_pair_tables_match_pair_layout() -> None:
    """The C macros that place codes in the activation pairs (and find an outlier's pair) are pair_layout."""
    from effllm_kernels.spqr.cuda_gemv import pair_macros
    from effllm_kernels.spqr.pair_asm import pair_layout

    for bits in (2, 3, 4):
        for p, (a, b, _, _) in enumerate(pair_layout(bits)):
            assert (pair_macros(bits, "PA", p), pair_macros(bits, "PB", p)) == (a, b)
            for code, half in ((a, 0), (b, 1)):
                assert (pair_macros(bits, "PAIR_OF", code), pair_macros(bits, "HALF_OF", code)) == (p, half)


def test_cuda_gemv_serves_bf16_decode_on_cuda_only() -> None:
    from effllm_kernels.spqr import cuda_gemv
    from effllm_kernels.spqr.launch import cuda_unsupported_reason, pick_config

    t = random_spqr_tensors(64, 256, seed=1, device="cpu")
    assert pick_config(1, t, torch.device("cpu"), torch.bfloat16).path != "cuda"
    assert "device cpu" in cuda_unsupported_reason(torch.bfloat16, t, torch.device("cpu"))
    assert "float16" in cuda_gemv.unsupported_reason(torch.float16, t)
    assert "5-bit" in cuda_gemv.unsupported_reason(torch.bfloat16, random_spqr_tensors(16, 128, 5, 16, seed=2))
    assert "blocks of 8" in cuda_gemv.unsupported_reason(torch.bfloat16, random_spqr_tensors(16, 128, 3, 16, 3, 8))
    assert "62 output" in cuda_gemv.unsupported_reason(torch.bfloat16, random_spqr_tensors(62, 128, seed=3))
    assert "bucketed" in cuda_gemv.unsupported_reason(torch.bfloat16, repack(t))  # repacked on the CPU: no copy
    assert repack(t).outlier_buckets is None


def test_cuda_gemv_configs_are_checked_and_the_heuristics_fit_shared_memory() -> None:
    from effllm_kernels.spqr import cuda_gemv

    with pytest.raises(ValueError, match="warps=2"):
        cuda_gemv.CudaGemvConfig(warps=2)
    with pytest.raises(ValueError, match="whole outlier buckets"):
        cuda_gemv.CudaGemvConfig(warps=4, units=2, max_steps=1)
    with pytest.raises(ValueError, match="48 KB"):
        cuda_gemv.source(3, 3, 16, cuda_gemv.CudaGemvConfig(units=4), True, True, 0)
    for n, k in ((4096, 4096), (14336, 4096), (4096, 14336), (1024, 4096), (40, 200), (8192, 28672)):
        layer = SimpleNamespace(in_features=k, out_features=n)
        for m in (1, 2, 3):
            cfg = cuda_gemv.heuristic(layer, m, 132)
            if cfg is None:
                continue
            split, steps = cuda_gemv.grid(layer, cfg, 132, m)
            assert steps <= cfg.max_steps and split * steps * cfg.warps * cfg.units * 32 >= k
            for sb, sg in ((3, 16), (2, 32), (4, 128), (16, 16)):
                assert cuda_gemv.shared_bytes(cfg, sb, sg) <= 48 * 1024
                assert "#define BITS 3" in cuda_gemv.source(3, sb, sg, cfg, True, True, 3)


def test_cuda_gemv_blocks_cover_every_unit_and_outlier_bucket_once() -> None:
    """The kernel's block arithmetic, in Python (CI has no GPU): with the launch of grid() (the heuristic's
    or other valid configs, M = 1-3), the K splits cover every unit once, none is empty, each starts on an
    outlier-bucket boundary and reads the buckets of its own units only, and the steps fit the build."""
    from effllm_kernels.spqr import cuda_gemv

    configs = [cuda_gemv.CudaGemvConfig(), cuda_gemv.CudaGemvConfig(max_steps=1, per_sm=4.0),
               cuda_gemv.CudaGemvConfig(4, 2, 4, 4, 4.0), cuda_gemv.CudaGemvConfig(8, 1, 2, 8, 1.0)]
    per_bucket = cuda_gemv.BUCKET // 32
    for k in (32, 100, 511, 512, 513, 4096, 5000, 14336, 28672, 65536):
        n_units, n_buckets = -(-k // 32), -(-k // cuda_gemv.BUCKET)
        for n in (4, 1000, 4096, 14336):
            layer = SimpleNamespace(in_features=k, out_features=n)
            for m in (1, 2, 3):
                for cfg in configs + [c for c in [cuda_gemv.heuristic(layer, m, 132)] if c]:
                    split, steps = cuda_gemv.grid(layer, cfg, 132, m)
                    built = min(cfg.max_steps, 1 << (steps - 1).bit_length())  # what launch() compiles
                    assert steps <= built
                    bu = cfg.warps * cfg.units
                    units, buckets = [], []
                    for kb in range(split):
                        ub = kb * bu * steps
                        nb = min(bu * steps, n_units - ub)
                        assert nb > 0 and ub % per_bucket == 0, (k, n, m, cfg, kb)
                        units += range(ub, ub + nb)
                        cb0 = ub // per_bucket
                        buckets += range(cb0, cb0 + min(bu * steps // per_bucket, n_buckets - cb0))
                    assert units == list(range(n_units)) and buckets == list(range(n_buckets)), (k, n, m, cfg)


# (m, n, k, bits, stat_bits, stat_group, permute, outlier density, bias dtype or None, CUDA launch or None
# for the heuristic): the 3/3/16/16 format at a real shape, ragged K (a padded unit, a partial bucket) and
# N not a multiple of 128, 2-bit without permutation or outliers in blocks of 32 rows, 4-bit with fp16
# statistics, 2- and 4-bit statistics, M = 2 and 3, bf16 / fp16 / fp32 biases, one K split and many,
# other block shapes.
def _cuda_cases() -> list:
    from effllm_kernels.spqr.cuda_gemv import CudaGemvConfig

    return [
        (1, 4096, 4096, 3, 3, 16, True, 0.01, None, None),
        (3, 1000, 1100, 3, 3, 16, True, 0.03, torch.bfloat16, None),
        (2, 256, 2048, 2, 3, 32, False, 0.0, None, None),
        (1, 512, 3000, 4, 16, 16, True, 0.02, torch.float32, None),  # SpQRLinear's bias is fp32
        (1, 4096, 14336, 3, 2, 16, True, 0.01, None, CudaGemvConfig(4, 2, 4, 4, 4.0, 2)),
        (2, 14336, 4096, 3, 4, 16, True, 0.01, torch.float16, CudaGemvConfig(8, 1, 2, 8, 1.0, 8)),
        (1, 1024, 4096, 4, 3, 16, True, 0.05, None, CudaGemvConfig(8, 2, 2, 1, 8.0, 8)),
    ]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("case", range(7))
def test_cuda_gemv_matches_reference_on_gpu(case: int) -> None:
    from effllm_kernels.spqr.cuda_gemv import ROWS
    from effllm_kernels.spqr.launch import KernelConfig

    m, n, k, bits, sb, sg, permute, density, bias_dtype, c = _cuda_cases()[case]
    t = random_spqr_tensors(n, k, bits, 16, sb, sg, outlier_density=density, permute=permute, seed=300 + case,
                            device="cuda")
    gen = torch.Generator(device="cuda").manual_seed(case)
    x = torch.randn(m, k, generator=gen, device="cuda").bfloat16()
    bias = torch.randn(n, generator=gen, device="cuda").to(bias_dtype) if bias_dtype else None
    kt = repack(t)
    cfg = None if c is None else KernelConfig("cuda", 1, ROWS, c.units, num_warps=c.warps, cuda=c)
    y = run_kernel(x, kt, bias, cfg)
    assert_close_to_reference(y, x, t, bias)
    assert torch.equal(run_kernel(x, kt, bias, cfg), y)  # split K in a fixed order: bit for bit again


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_cuda_mma_decode_fills_the_mma_operands_like_the_pair_decode(bits: int) -> None:
    """The CUDA tensor-core kernel's decode (run in Python from its generated C) puts pair 2i / 2i + 1 of
    row 0 / 1 into A[i] = (r0 p2i, r1 p2i, r0 p2i+1, r1 p2i+1), bit for bit what the Triton kernel's PTX
    decode (pair_asm.decode_asm, emulated) gives for each row and pair, for random words and statistics."""
    import struct

    import numpy as np

    from effllm_kernels.spqr.cuda_mma import emulate_decode_c
    from effllm_kernels.spqr.pair_asm import _pack, decode_asm, emulate_decode

    rng = np.random.default_rng(bits)
    asm, _ = decode_asm(bits)
    for _ in range(20):
        words = [[int(v) for v in rng.integers(0, 2**32, size=bits)] for _ in range(2)]
        stats = [[float(np.float16(v)) for v in rng.uniform(-2, 2, size=4)] for _ in range(2)]  # s0, nb0, s1, nb1
        s2 = [[_pack(st[0], st[0]), _pack(st[2], st[2])] for st in stats]
        n2 = [[_pack(st[1], st[1]), _pack(st[3], st[3])] for st in stats]
        got = emulate_decode_c(bits, (words[0], words[1]), s2, n2)
        for r in range(2):
            ops = words[r] + [words[r][0]] * (4 - bits) + [struct.unpack("<I", struct.pack("<f", v))[0] for v in stats[r]]
            want = emulate_decode(asm, ops)  # 32 fp16: codes a / b of pair p at 2p / 2p + 1
            for p in range(16):
                assert got[p >> 1][(p & 1) * 2 + r] == _pack(want[2 * p], want[2 * p + 1]), (bits, r, p)


def test_a_failed_cuda_build_is_reported_once_and_switches_both_cuda_kernels_off(monkeypatch, caplog) -> None:
    """cuda_gemv.build (both CUDA kernels build through it): any NVRTC / driver failure becomes one
    CompileError, the first one of the process is logged once, and usable() turns False, so the launch
    heuristics hand every layer to the Triton kernels."""
    import logging

    from effllm_kernels.spqr import cuda_gemv

    monkeypatch.setattr(cuda_gemv, "_FAILED", [])

    def broken(src, name):
        raise RuntimeError("nvrtc: error: bad source\nmore")

    monkeypatch.setattr(torch.cuda, "_compile_kernel", broken, raising=False)
    monkeypatch.setattr(torch.cuda, "device", lambda index: contextlib.nullcontext())
    with caplog.at_level(logging.WARNING, logger=cuda_gemv.log.name):
        for _ in range(2):
            with pytest.raises(cuda_gemv.CompileError, match="spqr test: NVRTC build failed .nvrtc: error: bad source."):
                cuda_gemv.build("src", ("a", "b"), 0, "spqr test")
    assert not cuda_gemv.usable() and len(cuda_gemv._FAILED) == 1
    assert sum("Triton kernels serve instead" in r.getMessage() for r in caplog.records) == 1


def test_cuda_mma_blocks_cover_every_unit_and_outlier_bucket_once_and_fit_shared_memory() -> None:
    """The tensor-core kernel's block plan in Python (the kernel needs a GPU, its index plan does not):
    the K splits of :func:`cuda_mma.grid` take whole buckets, cover every unit and bucket once, stay
    within the configured units; every variant the heuristic or a launch builds fits 48 KB of shared
    memory; configs are checked."""
    from effllm_kernels.spqr import cuda_mma
    from effllm_kernels.spqr.cuda_gemv import BUCKET

    with pytest.raises(ValueError):
        cuda_mma.CudaMmaConfig(units=24)
    with pytest.raises(ValueError):
        cuda_mma.CudaMmaConfig(units=128)
    with pytest.raises(ValueError):
        cuda_mma.CudaMmaConfig(stages=1)
    # 32 units fit 48 KB of static shared memory at 16 rows; 64 units, or a shared ring of steps, take
    # dynamic shared memory (all but the arrival flag)
    assert "#define DSM 0" in cuda_mma.source(3, 3, 16, cuda_mma.CudaMmaConfig(), 16, True, 0)
    for cfg, m in ((cuda_mma.CudaMmaConfig(units=64), 8), (cuda_mma.CudaMmaConfig(stages=3), 2)):
        assert "#define DSM 1" in cuda_mma.source(3, 3, 16, cfg, m, True, 0)
        assert cuda_mma.dynamic_shared_bytes(cfg, m, 3, 16, 3) == cuda_mma.shared_bytes(cfg, m, 3, 16, 3) - 16
    assert cuda_mma.dynamic_shared_bytes(cuda_mma.CudaMmaConfig(), 16, 3, 16, 3) == 0
    with pytest.raises(ValueError):
        cuda_mma.CudaMmaConfig(prefetch=0)
    per_bucket = BUCKET // 32
    for n, k in ((4096, 4096), (14336, 4096), (4096, 14336), (1024, 4096), (1000, 1100), (256, 2048), (512, 3000),
                 (4096, 5120), (2048, 11008)):  # the last two: 48 units a block at 64 units at most
        layer = SimpleNamespace(in_features=k, out_features=n)
        n_units, n_buckets = -(-k // 32), -(-k // BUCKET)
        for m in range(1, cuda_mma.MAX_M + 1):
            for cfg in [cuda_mma.CudaMmaConfig(), cuda_mma.CudaMmaConfig(16, 2, 4.0), cuda_mma.CudaMmaConfig(32, 1, 1.0)] + [
                    c for c in [cuda_mma.heuristic(layer, m, 132)] if c] + [cuda_mma.CudaMmaConfig(64, 2, 1.0)]:
                split, upb = cuda_mma.grid(layer, cfg, 132)
                assert upb % per_bucket == 0 and upb <= cfg.units
                units, buckets = [], []
                for kb in range(split):
                    ub = kb * upb
                    nb = min(upb, n_units - ub)
                    assert nb > 0  # no empty split
                    units += range(ub, ub + nb)
                    cb0 = ub * 32 // BUCKET
                    buckets += range(cb0, cb0 + min(upb * 32 // BUCKET, n_buckets - cb0))
                assert units == list(range(n_units)) and buckets == list(range(n_buckets)), (n, k, m, cfg)
                for sb, sg in ((3, 16), (2, 32), (4, 16), (16, 16)):
                    built = replace(cfg, units=upb)  # a valid config (48 units included)
                    assert cuda_mma.shared_bytes(built, m, sb, sg, 4) <= (  # 4 bits: the most
                        cuda_mma.MAX_SHARED if cfg.units > 32 else cuda_mma.STATIC_SHARED)
                    assert cuda_mma.shared_bytes(replace(built, stages=4), m, sb, sg, 4) <= cuda_mma.MAX_SHARED
    assert cuda_mma.heuristic(SimpleNamespace(in_features=4096, out_features=1024), 2, 132) is None  # small, M = 2-3
    assert cuda_mma.heuristic(SimpleNamespace(in_features=1024, out_features=4096), 3, 132) is None  # same size
    assert cuda_mma.heuristic(SimpleNamespace(in_features=4096, out_features=14336), 2, 132) is None  # large, M = 2
    assert cuda_mma.heuristic(SimpleNamespace(in_features=4096, out_features=14336), 3, 132) is not None


# (m, n, k, bits, stat_bits, stat_group, permute, outlier density, bias dtype or None, CudaMmaConfig fields
# or None for the defaults): the CUDA tensor-core kernel at 1-16 rows (one and two n-tiles, partial ones),
# the 3/3/16/16 format at real shapes, ragged K and N, 2-bit without permutation or outliers in blocks of
# 32 rows, 4-bit with fp16 statistics, 2- and 4-bit statistics, biases, one K split and many.
_CUDA_MMA_CASES = [
    (16, 4096, 4096, 3, 3, 16, True, 0.01, None, None),
    (5, 1000, 1100, 3, 3, 16, True, 0.03, torch.bfloat16, None),
    (8, 256, 2048, 2, 3, 32, False, 0.0, None, None),
    (12, 512, 3000, 4, 16, 16, True, 0.02, torch.float32, None),
    (16, 4096, 14336, 3, 2, 16, True, 0.01, None, (16, 2, 4.0)),
    (2, 14336, 4096, 3, 4, 16, True, 0.01, torch.float16, (32, 1, 1.0)),
    (1, 1024, 4096, 4, 3, 16, True, 0.05, None, (16, 2, 8.0)),
    (4, 4096, 512, 3, 3, 16, True, 0.02, torch.bfloat16, None),  # one K split: y written directly, with bias
    (9, 4, 16, 3, 3, 16, True, 0.1, None, None),  # one unit, one group, 4 rows: every clamp
    (8, 14336, 4096, 3, 3, 16, True, 0.01, None, (64, 2, 1.0)),  # 64-unit blocks: 48 KB + the flag at 8 rows
    (3, 4096, 14336, 3, 3, 16, True, 0.01, torch.bfloat16, (64, 2, 2.0)),
    (2, 1000, 3000, 4, 16, 16, False, 0.02, None, (64, 1, 1.0)),
    (16, 4096, 14336, 3, 3, 16, True, 0.01, None, (64, 2, 1.0)),  # 80 KB of dynamic shared memory
    (11, 1000, 3000, 4, 16, 16, True, 0.02, torch.float32, (64, 2, 2.0)),
    (4, 14336, 4096, 3, 3, 16, True, 0.01, None, (32, 2, 2.0, 1, 4, 4)),  # a shared ring of 4 steps
    (16, 4096, 14336, 2, 3, 16, False, 0.01, torch.bfloat16, (64, 2, 1.0, 1, 4, 3)),
    (7, 1000, 1100, 4, 16, 16, True, 0.03, None, (16, 2, 4.0, 1, 4, 2)),
    (12, 4096, 14336, 4, 16, 16, True, 0.01, None, (64, 2, 1.0)),  # fp16 statistics, dynamic shared memory
    (16, 4096, 14336, 4, 16, 16, True, 0.01, torch.float16, (32, 2, 2.0, 1, 4, 4)),  # and a ring above 48 KB
    (3, 512, 512, 3, 3, 16, True, 0.02, None, (32, 2, 2.0, 1, 4, 8)),  # fewer steps than the ring holds
    (5, 4096, 5120, 3, 3, 16, True, 0.01, None, (64, 2, 1.0, 1, 4, 3)),  # 48-unit blocks
]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("case", range(len(_CUDA_MMA_CASES)))
def test_cuda_mma_matches_reference_on_gpu(case: int) -> None:
    from effllm_kernels.spqr.cuda_mma import CudaMmaConfig
    from effllm_kernels.spqr.launch import KernelConfig

    m, n, k, bits, sb, sg, permute, density, bias_dtype, c = _CUDA_MMA_CASES[case]
    t = random_spqr_tensors(n, k, bits, 16, sb, sg, outlier_density=density, permute=permute, seed=400 + case,
                            device="cuda")
    gen = torch.Generator(device="cuda").manual_seed(case)
    x = torch.randn(m, k, generator=gen, device="cuda").bfloat16()
    bias = torch.randn(n, generator=gen, device="cuda").to(bias_dtype) if bias_dtype else None
    kt = repack(t)
    cfg = KernelConfig("cuda_mma", 16, 128, 4, cuda_mma=CudaMmaConfig(*c) if c else CudaMmaConfig())
    y = run_kernel(x, kt, bias, cfg)
    assert_close_to_reference(y, x, t, bias)
    assert torch.equal(run_kernel(x, kt, bias, cfg), y)  # split K in a fixed order: bit for bit again
    assert torch.equal(run_kernel(x[:1], kt, bias, cfg), y[:1])  # rows are independent of each other


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_gemv_is_the_bf16_decode_default_and_falls_back_on_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    from effllm_kernels.spqr import cuda_gemv
    from effllm_kernels.spqr.launch import pick_config

    t = random_spqr_tensors(4096, 4096, seed=21, device="cuda")
    kt = repack(t)
    dev = torch.device("cuda")
    assert [pick_config(m, kt, dev, torch.bfloat16).path for m in (1, 2, 3, 4, 16, 17)] == [
        "cuda", "cuda_mma", "cuda_mma", "cuda_mma", "cuda_mma", "mma16"]
    assert pick_config(1, kt, dev, torch.float16).path != "cuda"
    calls = []
    launch = cuda_gemv.launch
    monkeypatch.setattr(cuda_gemv, "launch", lambda *a: calls.append(1) or launch(*a))
    x = torch.randn(1, 4096, device="cuda").bfloat16()
    assert_close_to_reference(run_kernel(x, kt), x, t)
    assert calls == [1]  # the default ran the CUDA GEMV
    triton = run_kernel(x, kt, None, pick_config(1, kt, dev, torch.bfloat16, cuda=False))
    x4 = torch.randn(4, 4096, device="cuda").bfloat16()
    triton4 = run_kernel(x4, kt, None, pick_config(4, kt, dev, torch.bfloat16, cuda=False))
    assert_close_to_reference(run_kernel(x4, kt), x4, t)  # the CUDA tensor-core kernel
    kt.outlier_buckets = None  # a layer without the bucketed copy: the Triton kernels serve, same bits
    assert torch.equal(run_kernel(x, kt), triton) and calls == [1]
    assert torch.equal(run_kernel(x4, kt), triton4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_module_on_gpu_carries_bucketed_outliers_and_saves_the_stored_format() -> None:
    from effllm_tools.methods.spqr.format import SpQRLinear

    t = random_spqr_tensors(1024, 4096, seed=22, device="cpu")
    mod = SpQRLinear.from_tensors(t)
    stored = {k: v.clone() for k, v in mod.state_dict().items()}
    mod.cuda()
    assert mod.kernel_layout and mod.outlier_buckets is not None and mod.outlier_buckets.is_cuda
    assert mod.state_dict().keys() == stored.keys()
    for key, v in mod.state_dict().items():
        assert torch.equal(v.cpu(), stored[key]), key
    x = torch.randn(1, 4096, device="cuda").bfloat16()
    assert_close_to_reference(mod(x), x, t.to("cuda"))
    mod.unpack_buffers()
    assert mod.outlier_buckets is None
    cpu = SpQRLinear.from_tensors(t)
    cpu.repack_for_kernels()  # repacked on the CPU: no bucketed copy there ...
    assert cpu.outlier_buckets is None
    cpu.cuda()  # ... built when it moves to the GPU
    assert cpu.outlier_buckets is not None and torch.equal(cpu.outlier_buckets, mod.cuda().outlier_buckets)
    assert repack(t.to("cuda"), buckets=False).to("cuda").outlier_buckets is not None
