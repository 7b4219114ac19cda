"""Random :class:`SpqrTensors` for kernel tests and benchmarks (no calibration involved).

Every field is drawn at random within the format's contract: random codes (or random int32 words,
which are valid dense bit streams), statistics codes and fp16 second-level (step, zero-point) pairs
that give positive scales of a realistic size, a CSR outlier pattern at a given density (distinct
sorted columns per row), and optionally a random permutation.
"""

from __future__ import annotations

import torch

from effllm_kernels.packing import pack_codes, packed_words
from effllm_kernels.spqr.layout import STAT_FP16, SpqrTensors


def _randint_words(rows: int, words: int, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    return torch.randint(-(2**31), 2**31, (rows, words), dtype=torch.int32, generator=gen, device=device)


def _outliers(n: int, k: int, density: float, gen: torch.Generator, device: torch.device):
    """CSR (rowptr int32 [N+1], col int16 [nnz], val fp16 [nnz]) with about density * N * K entries."""
    counts = torch.binomial(torch.full((n,), float(k), device=device),
                            torch.full((n,), density, device=device), generator=gen).long()
    counts = counts.clamp(max=k)
    nnz = int(counts.sum())
    rowptr = torch.zeros(n + 1, dtype=torch.int64, device=device)
    rowptr[1:] = counts.cumsum(0)
    if nnz == 0:
        return rowptr.int(), torch.zeros(0, dtype=torch.int16, device=device), torch.zeros(
            0, dtype=torch.float16, device=device)
    # distinct columns per row: the first counts[r] entries of a random ordering of a row's columns
    keys = torch.rand(n, k, generator=gen, device=device)
    order = keys.argsort(dim=1)
    take = torch.arange(k, device=device)[None, :] < counts[:, None]
    cols = order.masked_fill(~take, k).sort(dim=1).values  # sorted, padding k at the end
    cols = cols[take]  # row-major: row by row, the real columns first in each row
    cols16 = torch.where(cols >= 2**15, cols - 2**16, cols).to(torch.int16)
    vals = (torch.randn(nnz, generator=gen, device=device) * 0.05).to(torch.float16)
    return rowptr.int(), cols16, vals


def random_spqr_tensors(
    n: int, k: int, bits: int = 3, group_size: int = 16, stat_bits: int = 3, stat_group: int = 16,
    outlier_density: float = 0.01, permute: bool = True, seed: int = 0,
    device: torch.device | str = "cpu",
) -> SpqrTensors:
    """A random, valid ``spqr`` layer of out x in = ``n`` x ``k`` on ``device``.

    Scales come out near 0.01 (weights of a typical linear layer), zero points inside the code range.
    """
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    g, blocks = -(-k // group_size), -(-n // stat_group)
    qweight = _randint_words(n, packed_words(k, bits), gen, device)
    if k * bits % 32:  # clear the padding bits of each row's last word, as pack_codes does
        keep = (1 << (k * bits % 32)) - 1
        last = qweight[:, -1].long() & keep
        qweight[:, -1] = torch.where(last >= 2**31, last - 2**32, last).int()
    fields: dict = {}
    if stat_bits == STAT_FP16:
        fields["scale_q"] = (torch.rand(n, g, generator=gen, device=device) * 0.01 + 0.005).half()
        fields["zero_q"] = (torch.rand(n, g, generator=gen, device=device) * ((1 << bits) - 1)).half()
        fields["scale_stats"] = fields["zero_stats"] = None
    else:
        top = (1 << stat_bits) - 1
        for name in ("scale", "zero"):
            codes = torch.randint(0, top + 1, (n, g), generator=gen, device=device)
            fields[f"{name}_q"] = pack_codes(codes, stat_bits)
            step = torch.rand(blocks, g, generator=gen, device=device)
            zp = torch.rand(blocks, g, generator=gen, device=device) * 0.5 - 0.5  # scales stay > 0
            if name == "scale":
                step = step * 0.01 / top + 0.002 / top
            else:
                step = step * ((1 << bits) - 1) / top
            fields[f"{name}_stats"] = torch.stack([step, zp], dim=-1).half()
    rowptr, col, val = _outliers(n, k, outlier_density, gen, device)
    perm = torch.randperm(k, generator=gen, device=device).int() if permute else None
    return SpqrTensors.from_parts(
        dict(in_features=k, out_features=n, bits=bits, group_size=group_size, stat_bits=stat_bits,
             stat_group=stat_group),
        dict(qweight=qweight, outlier_rowptr=rowptr, outlier_col=col, outlier_val=val, perm=perm, **fields),
    )
