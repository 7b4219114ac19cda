"""Token ids from a text, seeded calibration samples and the GPTQ-protocol evaluation windows.

- ``tokenize_text``: the whole text as one 1-D id tensor, exactly what ``tokenizer(text)`` gives.
- ``sample_calibration``: ``n_samples`` windows of ``seqlen`` tokens, drawn without replacement from
  the non-overlapping slots of the token stream with a seeded ``torch.Generator``.
- ``eval_windows``: the perplexity protocol of research/methods.md §7 (tokenize once, cut into
  ``numel // seqlen`` non-overlapping windows, drop the remainder).
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import re
from typing import Any

import torch

from effllm_tools.errors import BadInputError

CHUNK_CHARS = 1 << 16  # ~16k tokens of prose per chunk: enough chunks to keep every core busy
_PROBE_CHARS = 512  # context each side of a chunk boundary when checking that the cut is exact
_PARAGRAPH_BREAK = re.compile(r"\n\n(?=\S)")


@dataclasses.dataclass(frozen=True)
class CalibrationSample:
    """Calibration windows and their fingerprint.

    ``input_ids``: [n_samples, seqlen] int64. ``sha256``: hex digest of those ids as little-endian
    int64 bytes, row-major. ``meta``: n_samples, seqlen, seed, total_tokens, slots (the number of
    non-overlapping windows the text holds) and starts (each window's first token offset).
    """

    input_ids: torch.Tensor
    sha256: str
    meta: dict[str, Any]


def tokenize_text(tokenizer: Any, text: str) -> torch.Tensor:
    """``text`` as a 1-D int64 tensor of token ids, equal to ``tokenizer(text)["input_ids"]``.

    Special tokens are what the tokenizer adds by default, once for the whole text: a Llama-2
    tokenizer puts one BOS at the very start (as the GPTQ reference code does); SmolLM2's adds none.
    With a fast (Rust) tokenizer a long text is cut at paragraph breaks and the chunks are encoded
    in parallel, about twice as fast on two cores; each cut is first checked to tokenize exactly as
    the uncut text does, and any doubt falls back to a single call.
    """
    cuts = paragraph_cuts(text, CHUNK_CHARS)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    ids = _tokenize_chunked(tokenizer, backend, text, cuts) if backend is not None and len(cuts) > 2 else None
    if ids is None:
        ids = _tokenize_whole(tokenizer, text)
    return torch.tensor(ids, dtype=torch.long)


def paragraph_cuts(text: str, chunk_chars: int) -> list[int]:
    """Offsets ``[0, c1, ..., len(text)]`` cutting ``text`` into pieces of at least ``chunk_chars``.

    Each inner cut lies inside a paragraph break, before the last newline of a run of two or more
    newlines that is followed by a non-space character ("...end.\\n | \\nNext"): byte-level BPE
    tokenizers then see the same whitespace pieces on both sides as in the uncut text.
    """
    cuts = [0]
    while (match := _PARAGRAPH_BREAK.search(text, cuts[-1] + chunk_chars)) is not None:
        cuts.append(match.start() + 1)
    cuts.append(len(text))
    return cuts


def _tokenize_whole(tokenizer: Any, text: str) -> list[int]:
    ids = tokenizer(text, verbose=False)["input_ids"]  # verbose=False: no "longer than max length"
    return [int(i) for i in (ids.tolist() if hasattr(ids, "tolist") else ids)]


def _tokenize_chunked(tokenizer: Any, backend: Any, text: str, cuts: list[int]) -> list[int] | None:
    """Encode the pieces between ``cuts`` in one parallel batch, or None if that could differ."""
    affixes = _special_affixes(tokenizer, backend, text[: 2 * _PROBE_CHARS])
    if affixes is None or not _cuts_are_exact(backend, text, cuts[1:-1]):
        return None
    pieces = [text[start:end] for start, end in itertools.pairwise(cuts)]
    encodings = backend.encode_batch(pieces, add_special_tokens=False)
    prefix, suffix = affixes
    return prefix + [i for encoding in encodings for i in encoding.ids] + suffix


def _special_affixes(tokenizer: Any, backend: Any, probe: str) -> tuple[list[int], list[int]] | None:
    """The ids ``tokenizer`` adds before and after a text (e.g. [BOS], []), found on ``probe``."""
    full = _tokenize_whole(tokenizer, probe)
    plain = backend.encode(probe, add_special_tokens=False).ids
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return full[:start], full[start + len(plain) :]
    return None


def _cuts_are_exact(backend: Any, text: str, cuts: list[int]) -> bool:
    """Whether text around each cut tokenizes the same cut as uncut (``_PROBE_CHARS`` each side)."""
    spans = [(max(0, cut - _PROBE_CHARS), cut, cut + _PROBE_CHARS) for cut in cuts]
    whole = backend.encode_batch([text[a:c] for a, _, c in spans], add_special_tokens=False)
    left = backend.encode_batch([text[a:b] for a, b, _ in spans], add_special_tokens=False)
    right = backend.encode_batch([text[b:c] for _, b, c in spans], add_special_tokens=False)
    return all(w.ids == lt.ids + rt.ids for w, lt, rt in zip(whole, left, right, strict=True))


def sample_calibration(ids: torch.Tensor, n_samples: int, seqlen: int, seed: int) -> CalibrationSample:
    """``n_samples`` windows of ``seqlen`` tokens, drawn without replacement from the token stream.

    The stream is split into ``floor(len / seqlen)`` non-overlapping slots; a CPU ``torch.Generator``
    seeded with ``seed`` permutes the slots and the first ``n_samples`` are taken (in drawn order),
    so the same ids and seed give the same windows on any machine and no two windows overlap.
    Raises ``BadInputError`` when the text has fewer than ``n_samples * seqlen`` tokens.
    """
    ids = _as_1d_ids(ids, "calibration")
    if n_samples < 1 or seqlen < 1:
        raise BadInputError(f"calibration: --nsamples ({n_samples}) and --seqlen ({seqlen}) must be >= 1")
    total, wanted = ids.numel(), n_samples * seqlen
    if total < wanted:
        raise BadInputError(
            f"calibration text has {total} tokens, fewer than the {n_samples} x {seqlen} = {wanted} "
            "asked for; pass a larger --dataset or fewer --nsamples/--seqlen"
        )
    slots = total // seqlen
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    chosen = torch.randperm(slots, generator=generator)[:n_samples]
    windows = ids[: slots * seqlen].view(slots, seqlen)[chosen].contiguous()  # [n_samples, seqlen]
    starts = (chosen * seqlen).tolist()
    meta = {"n_samples": n_samples, "seqlen": seqlen, "seed": int(seed), "total_tokens": total}
    meta.update(slots=slots, starts=starts)
    return CalibrationSample(input_ids=windows, sha256=ids_sha256(windows), meta=meta)


def eval_windows(ids: torch.Tensor, seqlen: int, max_tokens: int | None = None) -> torch.Tensor:
    """The evaluation windows [n, seqlen] of the GPTQ protocol (research/methods.md §7).

    The first ``max_tokens`` tokens if given (the C4 variant uses ``256 * seqlen``), then
    ``n = numel // seqlen`` non-overlapping windows; the remainder is dropped. Raises
    ``BadInputError`` when not even one window fits.
    """
    ids = _as_1d_ids(ids, "evaluation")
    if seqlen < 1:
        raise BadInputError(f"evaluation: --seqlen must be >= 1, got {seqlen}")
    total = ids.numel()
    if max_tokens is not None:
        if max_tokens < 1:
            raise BadInputError(f"evaluation: --max-tokens must be >= 1, got {max_tokens}")
        ids = ids[:max_tokens]
    n = ids.numel() // seqlen
    if n == 0:
        if ids.numel() < total:  # the text is long enough: --max-tokens cut it below one window
            raise BadInputError(f"--max-tokens {max_tokens} is less than one window of --seqlen {seqlen} "
                                f"(the text has {total} tokens); raise --max-tokens or lower --seqlen")
        raise BadInputError(
            f"evaluation text has {total} tokens, fewer than one window of --seqlen {seqlen}; "
            "pass a larger --dataset or a smaller --seqlen"
        )
    return ids[: n * seqlen].view(n, seqlen)


def ids_sha256(ids: torch.Tensor) -> str:
    """SHA-256 hex digest of token ids as little-endian int64 bytes in row-major order."""
    array = ids.detach().to(device="cpu", dtype=torch.long).contiguous().numpy()
    return hashlib.sha256(array.astype("<i8", copy=False).tobytes()).hexdigest()


def _as_1d_ids(ids: torch.Tensor, what: str) -> torch.Tensor:
    """``ids`` as a 1-D int64 CPU tensor; a [1, n] batch of one is accepted and flattened."""
    if not isinstance(ids, torch.Tensor):
        ids = torch.as_tensor(ids)
    if ids.dim() == 2 and ids.shape[0] == 1:
        ids = ids[0]
    if ids.dim() != 1 or ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise BadInputError(
            f"{what}: token ids must be a 1-D integer tensor, got {tuple(ids.shape)} {ids.dtype}"
        )
    return ids.to(device="cpu", dtype=torch.long)
