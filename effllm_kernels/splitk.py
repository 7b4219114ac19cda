"""Split-K in one launch, shared by the dequantize-matmul kernels (``rtn``, ``spqr``).

A kernel that splits K over a grid axis stays ONE launch: each program writes its fp32 partial
tile to a workspace and bumps a per-tile arrival counter; the last program to arrive adds the
``split`` partials in split order (deterministic), writes y (+ bias, rounded once to y's dtype)
and puts the counter back to zero for the next call (:func:`finish`). Host side: the per-device
workspace and counters (:data:`SCRATCH`) and the checked output buffer (:func:`output_buffer`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


class Scratch:
    """Per-device fp32 split-K workspace and int32 arrival counters, kept between calls.

    The counters are zero between calls (the kernels reset them), so a call allocates and zeroes
    nothing; they only grow. Calls on one device share them, so split-K calls must not run
    concurrently on two streams of one device (calls on one stream, graphs included, are fine).
    Make the first split-K call of a process outside CUDA-graph capture (as usual warm-up does).
    """

    def __init__(self) -> None:
        self.ws: dict[torch.device, torch.Tensor] = {}
        self.cnt: dict[torch.device, torch.Tensor] = {}

    def get(self, device: torch.device, ws_elems: int, tiles: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(workspace of >= ``ws_elems`` fp32, >= ``tiles`` zeroed int32 counters) on ``device``."""
        ws, cnt = self.ws.get(device), self.cnt.get(device)
        if ws is None or ws.numel() < ws_elems:
            ws = self.ws[device] = torch.empty(max(ws_elems, 1 << 20), dtype=torch.float32, device=device)
        if cnt is None or cnt.numel() < tiles:
            cnt = self.cnt[device] = torch.zeros(max(tiles, 4096), dtype=torch.int32, device=device)
        return ws, cnt


#: The process-wide scratch buffers of every split-K kernel.
SCRATCH = Scratch()


def output_buffer(out: torch.Tensor | None, m: int, n: int, x: torch.Tensor) -> torch.Tensor:
    """The [m, n] result buffer: ``out`` viewed as such (checked), or a new one in x's dtype."""
    if out is None:
        return torch.empty(m, n, dtype=x.dtype, device=x.device)
    if out.dtype != x.dtype or out.device != x.device or out.numel() != m * n or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {x.dtype} tensor of {m}x{n} elements on {x.device}")
    return out.view(m, n)


@triton.jit
def to_out_dtype(out, y_ptr, INTERPRET: tl.constexpr):
    """fp32 -> y's dtype, rounded to nearest even (the interpreter truncates bf16: round by hand)."""
    if INTERPRET and y_ptr.dtype.element_ty == tl.bfloat16:
        b = out.to(tl.int32, bitcast=True)
        b = (b + (0x7FFF + ((b >> 16) & 1))) & -65536
        out = b.to(tl.float32, bitcast=True)
    return out.to(y_ptr.dtype.element_ty)


@triton.jit
def store_y(out, y_ptr, b_ptr, y_offs, rn_b, mask, HAS_BIAS: tl.constexpr, INTERPRET: tl.constexpr):
    """Write a finished fp32 tile (+ bias) to y in y's dtype."""
    if HAS_BIAS:
        out += tl.load(b_ptr + rn_b, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + y_offs, to_out_dtype(out, y_ptr, INTERPRET), mask=mask)


@triton.jit
def finish(out, y_ptr, ws_ptr, cnt_ptr, b_ptr, y_offs, ws_offs, ws_stride, pid_k, split, tile, rn_b, mask,
           USE_WS: tl.constexpr, LAST_REDUCES: tl.constexpr, HAS_BIAS: tl.constexpr, INTERPRET: tl.constexpr):
    """Store a finished tile, or (split K) a partial; the last of a tile's ``split`` programs reduces.

    ``ws_offs`` addresses split 0's partial; split ``s`` lives ``s * ws_stride`` further. The arrival
    counter ``cnt_ptr[tile]`` is zero between calls: the reducing program puts it back to zero.
    Without LAST_REDUCES only the partial is stored and a separate reduce kernel adds them (large
    tiles: one program reducing SPLIT partials of 64 KB serially would be the launch's tail).
    """
    if USE_WS and not LAST_REDUCES:
        tl.store(ws_ptr + ws_offs + pid_k * ws_stride, out, mask=mask)
    elif USE_WS:
        tl.store(ws_ptr + ws_offs + pid_k * ws_stride, out, mask=mask)
        tl.debug_barrier()  # every thread's partial is issued before the (release) arrival
        arrived = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel", scope="gpu")
        if arrived == split - 1:
            total = tl.zeros_like(out)
            for s in range(0, split):  # fixed order: the result does not depend on arrival order
                total += tl.load(ws_ptr + ws_offs + s * ws_stride, mask=mask, other=0.0, cache_modifier=".cg")
            tl.atomic_xchg(cnt_ptr + tile, 0, sem="relaxed", scope="gpu")
            store_y(total, y_ptr, b_ptr, y_offs, rn_b, mask, HAS_BIAS, INTERPRET)
    else:
        store_y(out, y_ptr, b_ptr, y_offs, rn_b, mask, HAS_BIAS, INTERPRET)
