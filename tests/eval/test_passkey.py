"""eval-passkey: prompts, greedy decoding and scoring, on an oracle model and through the CLI."""

from __future__ import annotations

import random
import re
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from effllm_tools.data.needles import INTRO, NEEDLE, QUESTION, Haystack, passkey_prompt
from effllm_tools.errors import BadInputError
from effllm_tools.eval.passkey import answer_budget, judge, min_prompt_tokens, passkey_trials, summarize
from tests.conftest import parse_json_stdout, run_cli


@pytest.fixture(scope="module")
def hay(tiny_llama):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    text = " ".join(f"Line {i} of a long and plain story." for i in range(2000))
    return Haystack("t", torch.tensor(tok(text)["input_ids"]), tok)


class Oracle(nn.Module):
    """Reads the needle out of the prompt (optionally garbling it) and emits it token by token."""

    def __init__(self, tok, garble: bool = False):
        super().__init__()
        self.tok, self.garble, self.queue = tok, garble, []
        self.config = SimpleNamespace(max_position_embeddings=10**6)

    def forward(self, input_ids, past_key_values=None, use_cache=True, logits_to_keep=None):
        if past_key_values is None:  # the prefill: find the answer
            text = self.tok.decode(input_ids[0])
            key = re.findall(r"magic number for (\w+)\?", text)[-1]
            value = re.search(rf"magic number for {key} is (\d+)\.", text).group(1)
            if self.garble:
                value = value[::-1] if value[::-1] != value else "1" + value
            self.queue = list(self.tok(" " + value + ".", add_special_tokens=False)["input_ids"])
        nxt = self.queue.pop(0) if self.queue else 0
        logits = torch.zeros(1, 1, 256)
        logits[0, 0, nxt] = 1.0
        return SimpleNamespace(logits=logits, past_key_values="cache")


def test_prompt_is_exact_length_and_holds_the_needle_at_depth(hay):
    for depth in (0.0, 0.5, 1.0):
        p = passkey_prompt(hay, 700, depth, random.Random(1))
        assert p.input_ids.shape == (700,)
        text = hay.tokenizer.decode(p.input_ids)
        key = re.findall(r"for (\w+)\?", text)[-1]
        assert text.endswith(f"The special magic number for {key} is")
        assert f"\nThe special magic number for {key} is {p.answer}.\n" in text
        head = len(hay.encode(INTRO))
        span = 700 - head - len(hay.encode(NEEDLE.format(key=key, value=p.answer))) - len(
            hay.encode(QUESTION.format(key=key)))
        rel = (p.position - head) / span
        assert depth - 40 / span <= rel <= depth + 1e-9  # moved back at most to the previous sentence end (~37 tokens)


def test_oracle_scores_one_and_a_wrong_model_zero(hay):
    kwargs = dict(lengths=[300, 600], depths=[0.0, 0.5, 1.0], trials=2, seed=0, device="cpu")
    good = summarize(passkey_trials(Oracle(hay.tokenizer), hay, **kwargs))
    bad = summarize(passkey_trials(Oracle(hay.tokenizer, garble=True), hay, **kwargs))
    assert good["accuracy"] == 1.0 and good["trials"] == 12
    assert good["accuracy_by_length_depth"]["600"] == {"0.0": 1.0, "0.5": 1.0, "1.0": 1.0}
    assert bad["accuracy"] == 0.0


class Counting(Oracle):
    """The oracle, counting the positions it is fed and the tokens it emits, per greedy decode."""

    def __init__(self, tok):
        super().__init__(tok)
        self.runs: list[dict[str, int]] = []

    def forward(self, input_ids, past_key_values=None, use_cache=True, logits_to_keep=None):
        if past_key_values is None:
            self.runs.append({"prompt": input_ids.shape[1], "fed": input_ids.shape[1], "emitted": 0})
        else:
            self.runs[-1]["fed"] += input_ids.shape[1]
        self.runs[-1]["emitted"] += 1
        return super().forward(input_ids, past_key_values, use_cache, logits_to_keep)


def test_prompt_plus_answer_fill_the_length_with_one_prompt_length_per_length(hay):
    """RULER's convention: a length counts the prompt and the generated tokens, so no token sits past it
    (transformers#33129: a longrope model answering past its original window reads wrong keys)."""
    model = Counting(hay.tokenizer)
    lengths, depths, trials = [300, 451, 600], [0.0, 0.5, 1.0], 3
    records = passkey_trials(model, hay, lengths=lengths, depths=depths, trials=trials, seed=0, device="cpu")
    budget = answer_budget(hay)
    assert budget == len(hay.encode(" 1234567")) + 3  # the byte tokenizer: one token per digit
    assert len(model.runs) == len(records) == len(lengths) * len(depths) * trials
    for run, rec in zip(model.runs, records, strict=True):
        assert run["prompt"] + run["emitted"] == rec["length"]  # prompt + generated == length
        assert run["fed"] < rec["length"]  # every position the model saw lies inside the length
        assert (rec["prompt_tokens"], rec["new_tokens"]) == (run["prompt"], budget)
    for n in lengths:
        assert {r["prompt_tokens"] for r in records if r["length"] == n} == {n - budget}
    assert summarize(records)["accuracy"] == 1.0


def test_lengths_too_short_for_prompt_and_answer_are_refused_and_the_minimum_works(hay):
    shortest = min_prompt_tokens(hay) + answer_budget(hay)
    with pytest.raises(BadInputError, match=f"at least {shortest}"):
        passkey_trials(Oracle(hay.tokenizer), hay, lengths=[600, shortest - 1], depths=[0.5], trials=1, seed=0,
                       device="cpu")
    # the minimum holds the widest needle and question: every key fits, and the oracle still retrieves
    records = passkey_trials(Oracle(hay.tokenizer), hay, lengths=[shortest], depths=[0.0, 1.0], trials=20, seed=0,
                             device="cpu")
    assert summarize(records)["accuracy"] == 1.0 and {r["prompt_tokens"] for r in records} == {min_prompt_tokens(hay)}


def test_judge():
    assert judge(" 1234567. And", "1234567")
    assert not judge(" 12345678", "1234567") and not judge(" none", "1234567")
    assert not judge(" 7654321 1234567", "1234567")


def test_cli_json_schema_limit_and_gate(tiny_llama):
    from effllm_tools.eval.passkey import run_eval_passkey

    with pytest.raises(BadInputError, match="--allow-beyond-max"):
        run_eval_passkey(str(tiny_llama), lengths=[300], depths=[0.5], device="cpu")
    proc = run_cli("eval-passkey", str(tiny_llama), "--lengths", "280,300", "--depths", "0,1", "--trials", "1",
                   "--allow-beyond-max", "--device", "cpu", "--min-accuracy", "0.99", "--json")
    assert proc.returncode == 5  # a random tiny model retrieves nothing: the gate fails
    obj = parse_json_stdout(proc)
    assert obj["command"] == "eval-passkey" and obj["status"] == "gate_failed"
    assert set(obj["metrics"]["accuracy_by_length"]) == {"280", "300"} and obj["metrics"]["trials"] == 4
    assert len(obj["records"]) == 4 and obj["settings"]["allow_beyond_max"] is True
    assert obj["settings"]["length_counts"] == "prompt + generated tokens"
    assert all(r["prompt_tokens"] + r["new_tokens"] == r["length"] for r in obj["records"])


@pytest.mark.parametrize("text", ["256,256", "256,,512", "0.5,0.5"])
def test_lists_with_empty_or_repeated_items_are_refused(text):
    from effllm_tools.eval.passkey import parse_list

    with pytest.raises(BadInputError, match="empty or repeated items"):
        parse_list(text, float, "depths")
