"""Written extend-context checkpoints: plain transformers computes what the search evaluated."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from effllm_tools.methods.longrope import rope
from effllm_tools.methods.longrope.install import installed_rope
from tests.conftest import REPO, run_cli

TINY_SEARCH = {"population": 4, "iterations": 2, "mutations": 2, "crossovers": 2, "parents": 2, "samples": 1,
               "eval_length": 600, "needles": 2}


def _run(model_dir, out, method, **keys):
    from effllm_tools.recipe import parse_recipe
    from effllm_tools.runner import run_recipe

    raw = {"version": 1, "model": str(model_dir), "stages": [{"method": method, **keys}],
           "output": {"path": str(out)}, "seed": 0}
    return run_recipe(parse_recipe(raw), device="cpu")


@pytest.fixture(scope="module")
def longrope2_out(tiny_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("lr2") / "out"
    res = _run(tiny_llama, out, "longrope2", target_length=1024, **TINY_SEARCH)
    return out, res["metrics"]


def _load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def test_transformers_computes_the_searched_frequencies_and_attention_factor(longrope2_out, tiny_llama):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    out, metrics = longrope2_out
    model = _load(out)
    cfg = model.config
    assert cfg.max_position_embeddings == 1024 and rope.existing_rope_type(cfg) == "longrope"
    base, dim = rope.rope_base_and_dim(cfg)
    inv_long, attn = ROPE_INIT_FUNCTIONS["longrope"](cfg, None, seq_len=257)
    inv_short, _ = ROPE_INIT_FUNCTIONS["longrope"](cfg, None, seq_len=256)
    assert torch.equal(inv_long, rope.longrope_inv_freq(base, dim, metrics["long_factor"]))
    assert torch.equal(inv_short, rope.longrope_inv_freq(base, dim, None))  # short factors: plain RoPE
    assert attn == metrics["attention_factor"] == pytest.approx(math.sqrt(1 + math.log(4) / math.log(256)))
    assert model.model.rotary_emb.attention_scaling == attn
    # The rotary module itself switches to the long table past the original window.
    rot = model.model.rotary_emb
    x = torch.zeros(1, 1, dtype=torch.float32)
    rot(x, torch.arange(300)[None])
    assert torch.equal(rot.inv_freq.cpu(), inv_long)
    rot(x, torch.arange(200)[None])
    assert torch.equal(rot.inv_freq.cpu(), inv_short)
    # Critical-dimension constraint held: factors >= s from the critical pair up, monotone overall.
    f, rcd = metrics["long_factor"], metrics["critical_dim"]
    assert all(v >= 4.0 for v in f[rcd:]) and f == sorted(f)
    assert len(metrics["search_curve"]) == 3 and metrics["search_evaluations"] >= 4


def test_short_inputs_give_the_base_logits_and_long_inputs_the_searched_rope(tiny_llama, tmp_path):
    out = tmp_path / "lr2-none"
    metrics = _run(tiny_llama, out, "longrope2", target_length=1024, mscale="none", **TINY_SEARCH)["metrics"]
    ext, base = _load(out), _load(tiny_llama)
    short = torch.randint(0, 256, (1, 256), generator=torch.Generator().manual_seed(0))
    long = torch.randint(0, 256, (1, 400), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(ext(short).logits, base(short).logits)  # up to the original window: unchanged
        with installed_rope(base, metrics["long_factor"], 1.0):
            want = base(long).logits
        torch.testing.assert_close(ext(long).logits, want, rtol=0, atol=1e-5)
        assert not torch.allclose(base(long).logits, want, atol=1e-3)


def test_checkpoint_loads_in_plain_transformers_without_effllm(longrope2_out, tmp_path):
    out, metrics = longrope2_out
    code = (
        "import sys, torch\n"
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(out)!r}).eval()\n"
        "assert not any(k.startswith('effllm') for k in sys.modules), 'effllm was imported'\n"
        f"src = {[str(REPO / d) for d in ('cli', 'effllm_tools', 'effllm_kernels')]!r}\n"
        "ours = [k for k, v in list(sys.modules.items()) if str(getattr(v, '__file__', '') or '').startswith(tuple(src))]\n"
        "assert not ours, ours\n"
        "ids = torch.randint(0, 256, (1, 600))\n"
        "with torch.no_grad(): y = m(ids).logits\n"
        "assert torch.isfinite(y).all()\n"
        "print(m.config.max_position_embeddings, m.model.rotary_emb.inv_freq.tolist())\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=300,
                          env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    first, inv = proc.stdout.split(" ", 1)
    assert int(first) == 1024
    base, dim = 10000.0, 16
    assert json.loads(inv) == rope.longrope_inv_freq(base, dim, metrics["long_factor"]).tolist()


def test_baselines_write_what_transformers_understands(tiny_llama, tmp_path):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    base, dim, s = 10000.0, 16, 4.0
    default = rope.longrope_inv_freq(base, dim, None)
    # PI: linear scaling, every frequency divided by s.
    pi = _load(_run(tiny_llama, tmp_path / "pi", "pi", target_length=1024)["output_dir"])
    torch.testing.assert_close(pi.model.rotary_emb.inv_freq.cpu(), default / s, rtol=1e-6, atol=0)
    # NTK: static base change θ s^{d/(d-2)} at every length (short = long factors, no attention factor).
    ntk = _load(_run(tiny_llama, tmp_path / "ntk", "ntk", target_length=1024)["output_dir"])
    ntk_ref = 1.0 / ((base * s ** (dim / (dim - 2))) ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    for n in (100, 600):
        ntk.model.rotary_emb(torch.zeros(1), torch.arange(n)[None])
        torch.testing.assert_close(ntk.model.rotary_emb.inv_freq.cpu().double(), ntk_ref, rtol=2e-6, atol=0)
    assert ntk.model.rotary_emb.attention_scaling == 1.0
    # YaRN: transformers' own type with beta 32 / 1 and the 0.1 ln s + 1 attention factor.
    yarn = _load(_run(tiny_llama, tmp_path / "yarn", "yarn", target_length=1024)["output_dir"])
    params = yarn.config.rope_parameters
    assert params["rope_type"] == "yarn" and params["factor"] == s and params["beta_fast"] == 32
    assert params["original_max_position_embeddings"] == 256 and yarn.config.max_position_embeddings == 1024
    want, attn = ROPE_INIT_FUNCTIONS["yarn"](yarn.config, None)
    assert torch.equal(yarn.model.rotary_emb.inv_freq.cpu(), want)
    assert attn == pytest.approx(0.1 * math.log(s) + 1)


def test_longrope_v1_searches_plain_perplexity_from_ntk(tiny_llama, tmp_path):
    keys = {k: v for k, v in TINY_SEARCH.items() if k != "needles"}
    metrics = _run(tiny_llama, tmp_path / "v1", "longrope", target_length=1024, **keys)["metrics"]
    assert metrics["search_data"]["objective"] == "document NLL"
    f = metrics["long_factor"]
    assert f == sorted(f) and f[0] >= 1.0 and metrics["critical_dim"] is None
    assert metrics["search_curve"][-1] <= metrics["search_curve"][0]


def test_mixed_window_finetuning_changes_weights_on_cpu(tiny_llama, tmp_path):
    from safetensors.torch import load_file

    res = _run(tiny_llama, tmp_path / "ft", "longrope2", target_length=1024, finetune_tokens=1500,
               finetune_lr=1e-3, **TINY_SEARCH)
    m = res["metrics"]
    assert m["finetune_windows"]["short"] >= 1 and m["finetune_windows"]["long"] >= 1
    assert all(math.isfinite(v) for vs in m["finetune_loss"].values() for v in vs)
    before = load_file(str(tiny_llama / "model.safetensors"))
    after = load_file(str(tmp_path / "ft" / "model.safetensors"))
    assert any(not torch.equal(before[k], after[k]) for k in before if k in after)


def test_bad_input_exits_2(tiny_llama, tmp_path):
    short = run_cli("extend-context", "--method", "longrope2", "--target-length", "128", str(tiny_llama),
                    "-o", str(tmp_path / "a"), "--device", "cpu")
    assert short.returncode == 2 and "must exceed the original context of 256" in short.stderr
    assert "Traceback" not in short.stderr


def test_unknown_key_and_missing_target_exit_2(tiny_llama, tmp_path):
    from effllm_tools.errors import BadInputError
    from effllm_tools.recipe import parse_recipe

    unknown = run_cli("extend-context", "--method", "yarn", "--target-length", "1024", "--set", "yarn.bogus=1",
                      str(tiny_llama), "-o", str(tmp_path / "b"), "--dry-run")
    assert unknown.returncode == 2 and "unknown key 'bogus'" in unknown.stderr
    with pytest.raises(BadInputError, match="target_length is required"):
        parse_recipe({"model": "m", "stages": [{"method": "pi"}]})
    with pytest.raises(BadInputError, match="parents .* must not exceed population"):
        parse_recipe({"model": "m", "stages": [{"method": "longrope2", "target_length": 9, "parents": 80}]})


def test_search_documents_spread_over_several_lengths(tiny_llama, tmp_path, caplog):
    keys = {**TINY_SEARCH, "samples": 3, "eval_length": [500, 600]}
    with caplog.at_level("INFO", logger="effllm"):
        metrics = _run(tiny_llama, tmp_path / "mixed", "longrope2", target_length=1024, **keys)["metrics"]
    assert metrics["search_data"]["length"] == [500, 600, 500]  # documents cycle through the lengths
    # The cost is announced after the first candidate (a log line, also without a terminal), and
    # every iteration logs its best objective.
    lines = [r.getMessage() for r in caplog.records]
    assert any("one candidate (3 documents of 500/600/500 tokens) took" in m and "at most 12 candidates" in m  # 4 + 2 x (2 + 2)
               for m in lines)
    assert sum("longrope2: iteration " in m for m in lines) == TINY_SEARCH["iterations"] + 1
    # A length inside the original window would score the short factors: one line, exit 2.
    bad = run_cli("extend-context", "--method", "longrope2", "--target-length", "1024", "--set",
                  "longrope2.eval_length=[200, 600]", str(tiny_llama), "-o", str(tmp_path / "bad"), "--device", "cpu")
    assert bad.returncode == 2 and "eval_length 200 must exceed the original context 256" in bad.stderr
    assert not (tmp_path / "bad").exists()
    # ... and one past the target would score positions the output never serves.
    long = run_cli("extend-context", "--method", "longrope2", "--target-length", "1024", "--set",
                   "longrope2.eval_length=2048", str(tiny_llama), "-o", str(tmp_path / "bad"), "--dry-run")
    assert long.returncode == 2 and "eval_length 2048 exceeds target_length 1024" in long.stderr


def test_shipped_longrope2_recipe_runs(tiny_llama, tmp_path):
    """The recipe as a user runs it, shrunk to the tiny model (target 4x its 256-token window)."""
    out = tmp_path / "recipe"
    keys = ["target_length=1024", "eval_length=[512, 1024]", "population=4", "iterations=1", "mutations=2",
            "crossovers=2", "parents=2", "samples=2", "needles=2"]
    res = run_cli("run", "recipes/longrope2-32k.yaml", "--model", str(tiny_llama), "-o", str(out), "--device", "cpu",
                  "--json", *[a for k in keys for a in ("--set", f"longrope2.{k}")])
    assert res.returncode == 0, res.stderr[-2000:]
    metrics = json.loads(res.stdout)["stages"][0]["metrics"]
    assert metrics["search_data"]["length"] == [512, 1024] and metrics["attention_factor"] > 1
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["max_position_embeddings"] == 1024


def test_dry_run_shows_the_search_documents_a_default_stands_for(tiny_llama, tmp_path):
    """--dry-run resolves what the keys leave to the model: the search documents of a candidate (the
    default eval_length: half the target twice, then the target) and the attention factor."""
    res = run_cli("extend-context", "--method", "longrope2", "--target-length", "1024", str(tiny_llama),
                  "-o", str(tmp_path / "d"), "--dry-run", "--json")
    assert res.returncode == 0, res.stderr[-2000:]
    details = json.loads(res.stdout)["plan"]["stage_details"][0]
    assert details["search_documents"] == [512, 512, 1024, 512, 512, 1024]  # window 256, s = 4
    assert details["attention_factor"] == round(rope.su_mscale(4.0, 256), 4)
    text = run_cli("extend-context", "--method", "yarn", "--target-length", "1024", str(tiny_llama),
                   "-o", str(tmp_path / "d"), "--dry-run")
    assert text.returncode == 0 and "resolved" not in text.stdout and not (tmp_path / "d").exists()
