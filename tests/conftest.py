"""Shared fixtures: tiny random decoder checkpoints and a CLI runner that uses a real subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: int = 600,
            threads: int = 1) -> subprocess.CompletedProcess:
    """Run ``effllm ARGS`` as a user would, in a fresh interpreter.

    Tiny models run fastest on one thread, and OpenMP threads spinning on a loaded 2-core machine
    slow small matmuls a hundredfold; the real-model tests pass ``threads=2``.
    """
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(threads), **(env or {})}
    return subprocess.run([sys.executable, "-m", "effllm_cli.main", *args], capture_output=True, text=True,
                          cwd=cwd or REPO, env=full_env, timeout=timeout)


def tree_digest(path: Path) -> dict[str, tuple[int, float]]:
    """Sizes and mtimes of every file under path: to prove an input was not touched."""
    return {str(p.relative_to(path)): (p.stat().st_size, p.stat().st_mtime) for p in sorted(path.rglob("*")) if p.is_file()}


def make_tiny_llama(path: Path, *, seed: int = 0, hidden: int = 64, layers: int = 2, vocab: int = 256) -> Path:
    """A tiny random LlamaForCausalLM with a real (byte-level) tokenizer, saved as safetensors."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden + 32,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(str(path))
    # Byte-level tokenizer: one token per byte, 256 ids (vocab must be >= 256).
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(str(path))
    return path


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "llama")


@pytest.fixture(scope="session")
def sample_text(tmp_path_factory) -> Path:
    """Real prose: this repository's own design notes and code comments are not enough; use a
    public-domain paragraph repeated with variation, long enough for a few windows."""
    words = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, "
             "must be in want of a wife. ").split()
    import random

    rng = random.Random(0)
    text = "\n".join(" ".join(rng.sample(words, len(words))) for _ in range(400))
    p = tmp_path_factory.mktemp("text") / "corpus.txt"
    p.write_text(text)
    return p


def parse_json_stdout(proc: subprocess.CompletedProcess) -> dict:
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stdout
    return json.loads(lines[0])
