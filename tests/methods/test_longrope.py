"""LongRoPE2 / LongRoPE / PI / NTK / YaRN: RoPE math against transformers, search, written checkpoints."""

from __future__ import annotations

import math
import random

import pytest
import torch

from effllm_tools.methods.longrope import rope
from effllm_tools.methods.longrope.install import installed_inv_freq, installed_rope, rotary_slots
from effllm_tools.methods.longrope.search import Evolution, SearchSettings, SearchSpace
from tests.tiny_models import ARCH_NAMES, build_model


def _ids(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 128, (1, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_unit_factors_and_scale_are_plain_rope_bit_for_bit(arch):
    model = build_model(arch)
    before = installed_inv_freq(model)
    ids = _ids(40)
    with torch.no_grad():
        ref = model(ids).logits
        base, dim = rope.rope_base_and_dim(model.config)
        with installed_rope(model, [1.0] * (dim // 2), 1.0) as inv:
            assert torch.equal(inv, before) and torch.equal(installed_inv_freq(model), before)
            got = model(ids).logits
    assert torch.equal(got, ref)
    assert torch.equal(installed_inv_freq(model), before)  # restored


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_installed_factors_change_the_model_and_are_restored(arch):
    model = build_model(arch)
    ids = _ids(40)
    with torch.no_grad():
        ref = model(ids).logits
        _, dim = rope.rope_base_and_dim(model.config)
        with installed_rope(model, [3.0] * (dim // 2), 1.2):
            changed = model(ids).logits
        again = model(ids).logits
    assert not torch.allclose(changed, ref, atol=1e-4)
    assert torch.equal(again, ref)
    if arch == "gemma3":  # the sliding-window layers keep plain RoPE
        rot = rotary_slots(model)[0][0]
        assert torch.equal(rot.sliding_attention_inv_freq, rot.sliding_attention_original_inv_freq)


def test_uniform_factors_equal_position_interpolation():
    from transformers import AutoModelForCausalLM, LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from tests.tiny_models import _COMMON

    s = 4.0
    cfg = LlamaConfig(**_COMMON, rope_parameters={"rope_type": "linear", "factor": s, "rope_theta": 10000.0})
    pi_inv, pi_scale = ROPE_INIT_FUNCTIONS["linear"](cfg, None)
    base, dim = rope.rope_base_and_dim(cfg)
    ours = rope.longrope_inv_freq(base, dim, [s] * (dim // 2))
    torch.testing.assert_close(ours, pi_inv, rtol=1e-6, atol=0)
    assert pi_scale == 1.0
    plain = build_model("llama")
    torch.manual_seed(0)
    pi_model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").float().eval()
    pi_model.load_state_dict(plain.state_dict())
    ids = _ids(60, 1)
    with torch.no_grad(), installed_rope(plain, [s] * (dim // 2), 1.0):
        torch.testing.assert_close(plain(ids).logits, pi_model(ids).logits, rtol=1e-5, atol=1e-5)


def test_critical_dimension_and_mscale_rules():
    # SmolLM2 (θ 1e5, d 64, 8k) and Llama-3 (θ 5e5, d 128, 8k): first pair whose period exceeds L.
    for base, dim, length, expected in ((1e5, 64, 8192, 20), (5e5, 128, 8192, 35)):
        i = rope.critical_dim(base, dim, length)
        assert i == expected
        assert 2 * math.pi * base ** (2 * i / dim) > length >= 2 * math.pi * base ** (2 * (i - 1) / dim)
    assert rope.su_mscale(4.0, 8192) == pytest.approx(math.sqrt(1 + math.log(4) / math.log(8192)))
    assert rope.su_mscale(1.0, 8192) == 1.0 and rope.resolve_mscale("none", 4.0, 8192) == 1.0
    assert rope.resolve_mscale("yarn", 4.0, 8192) == pytest.approx(0.1 * math.log(4) + 1)
    assert rope.resolve_mscale(1.2, 4.0, 8192) == 1.2
    for bad in (0, -1.0, float("nan"), float("inf"), "sue"):
        with pytest.raises(ValueError, match="mscale must be"):
            rope.resolve_mscale(bad, 4.0, 8192)


def test_ntk_factors_are_the_static_base_change():
    base, dim, s = 1e5, 64, 4.0
    ours = rope.longrope_inv_freq(base, dim, rope.ntk_factors(s, dim))
    new_base = base * s ** (dim / (dim - 2))
    ref = 1.0 / (new_base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    torch.testing.assert_close(ours.double(), ref, rtol=2e-6, atol=0)


# --- the search on a synthetic objective (fast, exact) -------------------------------------------------
SPACE = SearchSpace(n=8, step=0.01, kmin=400, kmax=800, rcd_lo=2, rcd_hi=4)
TARGET = [1.0, 1.5, 2.2, 3.0, 4.4, 5.0, 5.6, 7.1]


def _objective(log: list | None = None, stop_at: int | None = None):
    calls = [0]

    def f(factors: list[float]) -> float:
        calls[0] += 1
        if stop_at is not None and calls[0] == stop_at:
            raise KeyboardInterrupt
        if log is not None:
            log.append(list(factors))
        return sum((a - b) ** 2 for a, b in zip(factors, TARGET, strict=True))

    return f


SETTINGS = SearchSettings(population=12, iterations=6, mutations=4, crossovers=4, parents=6)
INIT = (4, (0, 0, 0, 0, 400, 400, 400, 400))


def test_search_is_seeded_improves_and_respects_constraints():
    log: list = []
    a = Evolution(SPACE, _objective(log), SETTINGS, seed=3).run(INIT)
    b = Evolution(SPACE, _objective(), SETTINGS, seed=3).run(INIT)
    c = Evolution(SPACE, _objective(), SETTINGS, seed=4).run(INIT)
    assert (a.factors, a.curve, a.rcd) == (b.factors, b.curve, b.rcd)
    assert c.curve != a.curve
    assert len(a.curve) == SETTINGS.iterations + 1
    assert all(x >= y for x, y in zip(a.curve, a.curve[1:], strict=False)) and a.curve[-1] < a.curve[0]
    assert a.evaluations == len(log) == len({tuple(f) for f in log})  # no candidate evaluated twice
    for f in log:  # monotone; >= s (4.0) at and above the critical pair; NTK-style ramp below it
        assert all(x <= y + 1e-12 for x, y in zip(f, f[1:], strict=False))
        rcd = next(i for i in range(8) if f[i] >= 4.0 - 1e-9)
        assert 2 <= rcd <= 4 and f[0] == 1.0
        assert all(v >= 4.0 and abs(v / 0.01 - round(v / 0.01)) < 1e-6 for v in f[rcd:])
        assert f[: rcd] == pytest.approx(rope.fill_lower_dims(f[rcd], rcd))


def test_extra_starts_join_the_initial_population_and_lift_the_plateau():
    """LongRoPE2's ``init_scales``: flat starts above s are evaluated first (after the init) and let
    the search reach factors the neighbour-bounded mutation finds slowly from a plateau at s."""
    from effllm_tools.methods.longrope.method import LongRoPE2Config, extra_starts

    cfg = LongRoPE2Config(target_length=4, init_scales=[1.3, 1.5])
    starts = extra_starts(cfg, SPACE, 4.0)
    assert len(starts) == 2 * 3 and starts[0] == (4, (0, 0, 0, 0, 520, 520, 520, 520))
    log: list = []
    with_starts = Evolution(SPACE, _objective(log), SETTINGS, seed=3).run(INIT, starts=starts)
    plain = Evolution(SPACE, _objective(), SETTINGS, seed=3).run(INIT)
    first = [SPACE.factors(r, k) for r, k in [INIT] + starts]
    assert log[: len(first)] == first  # evaluated in order, before any mutation
    assert with_starts.objective < plain.objective
    for f in log:  # the constraints still hold for every candidate
        assert all(x <= y + 1e-12 for x, y in zip(f, f[1:], strict=False)) and f[-1] <= 8.0


@pytest.mark.parametrize("stop_at", [5, 20, 37])  # during initialisation, in iteration 1, in a later one
def test_resumed_search_ends_where_an_uninterrupted_one_does(tmp_path, stop_at):
    full = Evolution(SPACE, _objective(), SETTINGS, seed=7).run(INIT)
    state = tmp_path / "search.json"
    with pytest.raises(KeyboardInterrupt):
        Evolution(SPACE, _objective(stop_at=stop_at), SETTINGS, seed=7, state_path=state, fingerprint="x").run(INIT)
    calls: list = []
    resumed = Evolution(SPACE, _objective(calls), SETTINGS, seed=7, state_path=state, fingerprint="x").run(
        INIT, resume=True)
    assert (resumed.factors, resumed.curve, resumed.objective) == (full.factors, full.curve, full.objective)
    assert len(calls) == full.evaluations - (stop_at - 1)  # cached values are not recomputed
    # a different fingerprint (other settings) never resumes from this state
    fresh = Evolution(SPACE, _objective(), SETTINGS, seed=7, state_path=state, fingerprint="y").run(INIT, resume=True)
    assert fresh.resumed_from is None


def test_fill_lower_dims_matches_released_llama3_ramp():
    ramp = rope.fill_lower_dims(21.81, 33)
    assert ramp[0] == 1.0 and ramp[1] == pytest.approx(1.097906416, rel=1e-6)
    assert ramp[32] == pytest.approx(19.8650811, rel=1e-6)


def test_needle_documents_are_exact_length_and_score_the_answers(tiny_llama):
    from transformers import AutoTokenizer

    from effllm_tools.data.needles import Haystack, needle_document

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    text = " ".join(f"Sentence number {i} is here." for i in range(3000))
    hay = Haystack("t", torch.tensor(tok(text)["input_ids"]), tok)
    doc = needle_document(hay, 1500, 3, random.Random(0))
    assert doc.input_ids.shape == (1500,)
    answers = tok.decode(doc.input_ids[doc.answer_positions])
    assert sorted(answers.split()) == sorted(n["value"] for n in doc.needles)
    for n in doc.needles:  # each needle sits where it says, in depth order of the haystack
        piece = tok.decode(doc.input_ids[n["position"]: n["position"] + 60])
        assert piece.startswith(f"\nThe special magic number for {n['key']} is {n['value']}.")
    assert tok.decode(doc.input_ids[-1:]) == "."


def test_default_search_documents_cover_half_and_full_target():
    """longrope2 scores four documents of half the target and two of the target by default (the long
    factors serve every length past the window); v1 keeps the target alone; a target below twice the
    window has no half-length documents past it; an explicit eval_length wins."""
    from effllm_tools.methods.longrope.method import LongRoPE2Config, SearchConfig, search_lengths

    lr2 = LongRoPE2Config(target_length=32768)
    assert lr2.samples == 6 and search_lengths(lr2, 8192, 32768) == [16384, 16384, 32768]
    assert [search_lengths(lr2, 8192, 32768)[i % 3] for i in range(lr2.samples)].count(16384) == 4
    assert search_lengths(LongRoPE2Config(target_length=16384), 8192, 16384) == [16384]
    v1 = SearchConfig(target_length=32768)
    assert v1.samples == 4 and search_lengths(v1, 8192, 32768) == [32768]
    assert search_lengths(LongRoPE2Config(target_length=32768, eval_length=20000), 8192, 32768) == [20000]
