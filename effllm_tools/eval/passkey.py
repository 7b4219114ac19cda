"""``effllm eval-passkey``: passkey retrieval accuracy over context lengths and needle depths.

A ``length`` counts the prompt and the generated tokens (RULER's convention): each trial decodes
greedily a fixed ``answer_budget`` tokens (the tokens of " <7 digits>" under the tokenizer, plus 3)
after a prompt of ``length - answer_budget`` tokens, so no token sits at a position past ``length``.
The prompt is real text (the haystack) with one needle "The special magic number for <key> is
<7 digits>." at ``depth`` (0 = start, 1 = end), ending with the question "... The special magic number
for <key> is". A trial is correct when the first run of digits the model writes equals the needle's
number. The same document builder (``effllm_tools.data.needles``) makes LongRoPE2's needle-driven
search documents.

Why the answer counts: with transformers' ``longrope`` rope type, a generation that starts at or below
the original window and runs past it switches to the long factors while the KV cache holds keys
rotated with the short ones (transformers#33129); a prompt of exactly the original window answered
past it measured that artifact, not retrieval.
"""

from __future__ import annotations

import random
import re
import time
from typing import Any

import torch

from effllm_tools.data.needles import INTRO, KEYS, NEEDLE, QUESTION, Haystack, load_haystack, passkey_prompt
from effllm_tools.errors import BadInputError
from effllm_tools.reporting import Reporter

DEFAULT_HAYSTACK = "austen-persuasion"
ANSWER_SLACK = 3  # tokens decoded after the number's own (the judge reads the first run of digits)
# 7-digit numbers to size the answer by: every repeated digit and a fixed sample. Tokenizers that split
# digits (one or up to three per token) give every number the same count; merging BPEs vary a little.
_PROBE = [d * 7 for d in "123456789"] + [str(n) for n in random.Random(0).sample(range(1_000_000, 10_000_000), 32)]


def answer_budget(hay: Haystack) -> int:
    """Tokens decoded per trial: the most any probe " <7 digits>" takes under this tokenizer, plus
    ``ANSWER_SLACK``. A function of the tokenizer alone, so every trial at a length has one prompt length."""
    return max(len(hay.encode(" " + v)) for v in _PROBE) + ANSWER_SLACK


def min_prompt_tokens(hay: Haystack) -> int:
    """The shortest prompt that holds the intro, any needle, any question and one haystack token."""
    head = len(hay.prefix_special()) + len(hay.encode(INTRO))
    widest = max(len(hay.encode(NEEDLE.format(key=k, value=v))) + len(hay.encode(QUESTION.format(key=k)))
                 for k in KEYS for v in _PROBE)
    return head + widest + 1


def check_lengths(hay: Haystack, lengths: list[int]) -> int:
    """Refuse a length whose prompt (``length - answer_budget``) cannot hold the needle and the
    question; return the budget."""
    budget = answer_budget(hay)
    need = min_prompt_tokens(hay)
    if short := [n for n in lengths if n - budget < need]:
        raise BadInputError(f"--lengths {min(short)}: too short with this tokenizer: a length counts the prompt "
                            f"(at least {need} tokens for the intro, needle and question) and the answer ({budget}), "
                            f"so every length must be at least {need + budget}")
    return budget


@torch.inference_mode()
def greedy_decode(model: Any, ids: torch.Tensor, max_new_tokens: int, device: Any) -> list[int]:
    """Greedy continuation of ``ids`` [L] with the KV cache; returns the new token ids."""
    x = ids[None].to(device)
    try:
        out = model(input_ids=x, use_cache=True, logits_to_keep=1)
    except TypeError:
        out = model(input_ids=x, use_cache=True)
    tokens: list[int] = []
    for step in range(max_new_tokens):
        nxt = out.logits[0, -1].argmax()
        tokens.append(int(nxt))
        if step + 1 < max_new_tokens:
            out = model(input_ids=nxt.view(1, 1), past_key_values=out.past_key_values, use_cache=True)
    return tokens


def judge(text: str, answer: str) -> bool:
    """Correct when the first run of digits in the model's continuation is the passkey."""
    found = re.search(r"\d+", text)
    return bool(found) and found.group(0) == answer


def passkey_trials(model: Any, hay: Haystack, *, lengths: list[int], depths: list[float], trials: int, seed: int,
                   device: Any, reporter: Reporter | None = None) -> list[dict[str, Any]]:
    """Run every (length, depth, trial) and return one record per trial: a prompt of ``length - budget``
    tokens and ``budget`` (``answer_budget``) greedy tokens, so prompt + answer fill ``length`` positions."""
    reporter = reporter or Reporter()
    budget = check_lengths(hay, lengths)
    rng = random.Random(seed)
    plan = [(n, d, t) for n in lengths for d in depths for t in range(trials)]
    records = []
    for length, depth, _ in reporter.progress_iter(plan, "eval-passkey", total=len(plan)):
        prompt = passkey_prompt(hay, length - budget, depth, rng)
        new = greedy_decode(model, prompt.input_ids, budget, device)
        text = hay.tokenizer.decode(new, skip_special_tokens=True)  # no end-of-turn marker in the records
        records.append({"length": length, "depth": depth, "answer": prompt.answer, "output": text,
                        "prompt_tokens": int(prompt.input_ids.numel()), "new_tokens": len(new),
                        "needle_position": prompt.position, "correct": judge(text, prompt.answer)})
    return records


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Accuracy overall, per length, and per (length, depth)."""
    def acc(rs: list[dict[str, Any]]) -> float:
        return sum(r["correct"] for r in rs) / len(rs) if rs else 0.0

    lengths = sorted({r["length"] for r in records})
    by_length = {str(n): acc([r for r in records if r["length"] == n]) for n in lengths}
    by_depth = {str(n): {str(d): acc([r for r in records if r["length"] == n and r["depth"] == d])
                         for d in sorted({r["depth"] for r in records if r["length"] == n})} for n in lengths}
    return {"accuracy": acc(records), "accuracy_by_length": by_length, "accuracy_by_length_depth": by_depth,
            "trials": len(records)}


def parse_list(text: str, kind: type, what: str) -> list:
    items = text.replace(" ", "").split(",")
    try:
        values = [kind(v) for v in items if v]
    except ValueError:
        raise BadInputError(f"--{what} {text!r}: expected a comma-separated list of numbers") from None
    if not values:
        raise BadInputError(f"--{what}: empty list")
    if "" in items or len(set(values)) != len(values):  # "256,,512", "256,256": a typo, never meant
        raise BadInputError(f"--{what} {text!r}: empty or repeated items")
    return values


def run_eval_passkey(model: str, *, lengths: list[int], depths: list[float], trials: int = 5,
                     dataset: str = DEFAULT_HAYSTACK, device: str = "auto", dtype: str = "auto", seed: int = 0,
                     allow_beyond_max: bool = False, reporter: Reporter | None = None) -> dict[str, Any]:
    from effllm_tools.io.load import load_model
    from effllm_tools.runner import resolve_device, seed_everything

    if trials < 1:
        raise BadInputError(f"--trials must be at least 1, got {trials}")
    if any(n < 64 for n in lengths):
        raise BadInputError(f"--lengths {min(lengths)}: too short (a length must hold the intro, needle, question and "
                            "answer: at least 64 tokens, the exact minimum for the tokenizer is checked after loading)")
    if bad := [d for d in depths if not 0.0 <= d <= 1.0]:
        raise BadInputError(f"--depths: every depth must lie in [0, 1], got {bad[0]:g}")
    device = resolve_device(device)
    seed_everything(seed)
    t0 = time.perf_counter()
    loaded = load_model(model, device=device, dtype=None if dtype == "auto" else dtype)
    limit = getattr(loaded.model.config, "max_position_embeddings", None)
    if limit is not None and max(lengths) > limit and not allow_beyond_max:
        raise BadInputError(f"--lengths {max(lengths)} exceeds the model's limit of {limit} tokens "
                            "(max_position_embeddings); pass --allow-beyond-max to measure it anyway")
    hay = load_haystack(loaded.tokenizer, dataset)
    t_load = time.perf_counter() - t0
    t1 = time.perf_counter()
    records = passkey_trials(loaded.model, hay, lengths=lengths, depths=depths, trials=trials, seed=seed,
                             device=device, reporter=reporter)
    t_eval = time.perf_counter() - t1
    settings = {"model": model, "dataset": dataset, "text_sha256": hay.meta.get("text_sha256"), "lengths": lengths,
                "depths": depths, "trials_per_cell": trials, "seed": seed, "device": device,
                "dtype": str(next(loaded.model.parameters()).dtype).removeprefix("torch."),
                "max_position_embeddings": limit, "allow_beyond_max": allow_beyond_max, "decoding": "greedy",
                "length_counts": "prompt + generated tokens", "new_tokens": answer_budget(hay)}
    return {"metrics": summarize(records), "settings": settings, "timings": {"load_s": t_load, "eval_s": t_eval},
            "records": records}
