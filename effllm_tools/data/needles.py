"""Long documents from real text with inserted needles (LongRoPE2 §3.1; passkey retrieval).

LongRoPE2 (arXiv 2502.20082, §3.1) scores a RoPE rescaling by a *needle-driven* perplexity: long
documents get needles ("The special magic number for <key> is <7 digits>.") at random depths, the
document ends with questions about them, and only the answer tokens count. Plain perplexity over a
long document is dominated by tokens that need only local context, which is why it misjudges
rescalings; the answers can only be predicted by attending back across the whole document.

Documents are assembled at the token level from a contiguous span of a real text (the haystack), so a
document has exactly the requested number of tokens. Needles go in at sentence boundaries near the
requested depth. The same builder makes the passkey-retrieval prompts (one needle, the prompt ends
right before the answer).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import torch

from effllm_tools.errors import BadInputError

INTRO = ("There is important information hidden inside a lot of irrelevant text. "
         "Find it and memorize it. I will quiz you about it.\n\n")
NEEDLE = "\nThe special magic number for {key} is {value}.\n"
QUESTION = "\n\nWhat is the special magic number for {key}? The special magic number for {key} is"
ANSWER = " {value}"  # the scored tokens; the closing period after it is not scored
KEYS = ("apple", "harbour", "violet", "lantern", "meadow", "copper", "falcon", "orchard", "saffron", "glacier",
        "marble", "thistle", "compass", "juniper", "beacon", "walnut", "quartz", "heron", "tulip", "canyon",
        "ember", "willow", "summit", "pebble", "cobalt", "sparrow", "lagoon", "cedar", "ribbon", "anchor")


@dataclass
class Haystack:
    """A tokenized real text to cut documents from."""

    name: str
    ids: torch.Tensor  # [n] int64
    tokenizer: Any
    meta: dict[str, Any] = field(default_factory=dict)
    _boundary: dict[int, bool] = field(default_factory=dict)

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def prefix_special(self) -> list[int]:
        """What the tokenizer puts before a text by default (a BOS for Llama-2 style tokenizers)."""
        with_special = list(self.tokenizer("x")["input_ids"])
        plain = self.encode("x")
        n = len(with_special) - len(plain)
        return with_special[:n] if n > 0 and with_special[n:n + len(plain)] == plain else []

    def is_boundary(self, token_id: int) -> bool:
        """Whether the token ends a sentence or a line (needles go in after one)."""
        if token_id not in self._boundary:
            text = self.tokenizer.decode([token_id])
            self._boundary[token_id] = text.rstrip(" ").endswith((".", "!", "?", "\n"))
        return self._boundary[token_id]


def load_haystack(tokenizer: Any, spec: str) -> Haystack:
    """Tokenize the text ``spec`` (a named set or path, see ``load_text``) once."""
    from effllm_tools.data.calibration import tokenize_text
    from effllm_tools.data.sources import load_text

    text = load_text(spec)
    ids = tokenize_text(tokenizer, text.text)
    return Haystack(spec, ids, tokenizer, {"dataset": spec, "text_sha256": text.meta.get("sha256"),
                                           "tokens": int(ids.numel())})


@dataclass
class NeedleDocument:
    """One document: ``input_ids`` [length]; ``answer_positions`` index the tokens that are scored."""

    input_ids: torch.Tensor
    answer_positions: list[int]
    needles: list[dict[str, Any]]  # key, value, depth (fraction of the haystack), position (token index)


def _span(hay: Haystack, n: int, rng: random.Random) -> list[int]:
    total = int(hay.ids.numel())
    if n > total:
        raise BadInputError(f"{hay.name}: {total} tokens, too short for a {n}-token document")
    start = rng.randrange(0, total - n + 1)
    return hay.ids[start:start + n].tolist()


def _insertion_point(hay: Haystack, span: list[int], depth: float) -> int:
    """Token index at ``depth`` of the span, moved back to just after a sentence end when one is near."""
    pos = round(depth * len(span))
    for back in range(min(pos, 200)):
        if hay.is_boundary(span[pos - back - 1]):
            return pos - back
    return pos


def _needles(n: int, rng: random.Random) -> list[dict[str, Any]]:
    keys = rng.sample(KEYS, n)
    return [{"key": k, "value": str(rng.randrange(1_000_000, 10_000_000))} for k in keys]


def _assemble(hay: Haystack, length: int, needles: list[dict[str, Any]], tail: list[int], rng: random.Random
              ) -> tuple[list[int], list[dict[str, Any]]]:
    head = hay.prefix_special() + hay.encode(INTRO)
    pieces = [hay.encode(NEEDLE.format(**nd)) for nd in needles]
    n_hay = length - len(head) - sum(len(p) for p in pieces) - len(tail)
    if n_hay < 1:
        raise BadInputError(f"a {length}-token document cannot hold {len(needles)} needle(s) and the questions")
    span = _span(hay, n_hay, rng)
    order = sorted(range(len(needles)), key=lambda j: needles[j]["depth"])
    ids, cursor = list(head), 0
    for j in order:
        at = max(_insertion_point(hay, span, needles[j]["depth"]), cursor)
        ids += span[cursor:at]
        needles[j]["position"] = len(ids)
        ids += pieces[j]
        cursor = at
    ids += span[cursor:] + tail
    return ids, needles


def needle_document(hay: Haystack, length: int, n_needles: int, rng: random.Random) -> NeedleDocument:
    """A ``length``-token document with ``n_needles`` needles at random depths, then one question and
    answer per needle (in random order); the answer tokens are the scored ones."""
    needles = _needles(n_needles, rng)
    for nd in needles:
        nd["depth"] = rng.random()
    tail: list[int] = []
    scored_rel: list[int] = []
    for nd in rng.sample(needles, len(needles)):
        tail += hay.encode(QUESTION.format(key=nd["key"]))
        answer = hay.encode(ANSWER.format(value=nd["value"]))
        scored_rel += [len(tail) + k for k in range(len(answer))]
        tail += answer + hay.encode(".")
    ids, needles = _assemble(hay, length, needles, tail, rng)
    offset = len(ids) - len(tail)
    assert len(ids) == length
    return NeedleDocument(torch.tensor(ids, dtype=torch.long), [offset + r for r in scored_rel], needles)


@dataclass
class PasskeyPrompt:
    """A retrieval prompt of exactly ``length`` tokens that ends right before the answer."""

    input_ids: torch.Tensor
    answer: str
    depth: float
    position: int


def passkey_prompt(hay: Haystack, length: int, depth: float, rng: random.Random) -> PasskeyPrompt:
    """One needle at ``depth`` (0 = start of the haystack, 1 = end), the question at the end."""
    if not 0.0 <= depth <= 1.0:
        raise BadInputError(f"depth {depth} is outside [0, 1]")
    (needle,) = _needles(1, rng)
    needle["depth"] = depth
    tail = hay.encode(QUESTION.format(key=needle["key"]))
    ids, (needle,) = _assemble(hay, length, [needle], tail, rng)
    assert len(ids) == length
    return PasskeyPrompt(torch.tensor(ids, dtype=torch.long), needle["value"], depth, needle["position"])


def long_document(hay: Haystack, length: int, rng: random.Random) -> torch.Tensor:
    """A plain ``length``-token span of the haystack (LongRoPE v1's perplexity documents)."""
    return torch.tensor(_span(hay, length, rng), dtype=torch.long)
