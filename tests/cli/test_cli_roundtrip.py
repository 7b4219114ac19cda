"""The CLI as a user runs it: subprocess round trips on a tiny random checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import parse_json_stdout, run_cli, tree_digest


def test_version_and_help():
    proc = run_cli("--version")
    assert proc.returncode == 0 and proc.stdout.startswith("effllm ")
    proc = run_cli("--help")
    assert proc.returncode == 0
    for verb in ("quantize", "quantize-kv", "prune", "extend-context", "sparsify-attn", "eval-ppl", "run", "inspect"):
        assert verb in proc.stdout


def test_list_methods_needs_no_model():
    """``--list-methods`` answers without a MODEL; every listed name is a method of that verb."""
    from effllm_tools.registry import all_methods

    for verb in ("quantize", "prune", "extend-context"):
        proc = run_cli(verb, "--list-methods", "--json")
        assert proc.returncode == 0, proc.stderr
        names = [m["name"] for m in parse_json_stdout(proc)["methods"]]
        assert names and sorted(names) == sorted(m.name for m in all_methods().values() if m.verb == verb)
    assert "wanda++" in run_cli("prune", "--list-methods").stdout


def test_quantize_prints_output_dir_and_writes_a_loadable_checkpoint(tiny_llama, tmp_path):
    before = tree_digest(tiny_llama)
    out = tmp_path / "q4"
    proc = run_cli("quantize", "--method", "rtn", "--bits", "4", "--group-size", "32", str(tiny_llama), "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(out.resolve())  # stdout is only the result, so $(...) chains
    assert tree_digest(tiny_llama) == before
    for name in ("config.json", "model.safetensors", "tokenizer.json", "effllm_provenance.json",
                 "effllm_recipe.yaml", "README.md", "generation_config.json"):
        assert (out / name).is_file(), name
    config = json.loads((out / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc["quant_method"] == "effllm" and len(qc["modules"]) == 2 * 7
    prov = json.loads((out / "effllm_provenance.json").read_text())
    assert prov["seed"] == 0 and prov["packages"]["torch"] and prov["stages"][0]["method"] == "rtn"
    assert not list(tmp_path.glob(".*partial*"))


def test_json_result_and_eval_ppl_chain(tiny_llama, tmp_path, sample_text):
    out = tmp_path / "q8"
    proc = run_cli("quantize", "--bits", "8", "--group-size", "64", str(tiny_llama), "-o", str(out), "--json")
    assert proc.returncode == 0, proc.stderr
    res = parse_json_stdout(proc)
    assert res["schema"] == "effllm.result/1" and res["status"] == "ok" and res["output_dir"] == str(out.resolve())
    assert 8.0 < res["metrics"]["avg_bits"] < 9.5
    base = run_cli("eval-ppl", str(tiny_llama), "--dataset", str(sample_text), "--seqlen", "64", "--json")
    quant = run_cli("eval-ppl", res["output_dir"], "--dataset", str(sample_text), "--seqlen", "64", "--json",
                    "--kld-base", str(tiny_llama))
    assert base.returncode == 0 and quant.returncode == 0, base.stderr + quant.stderr
    b, q = parse_json_stdout(base), parse_json_stdout(quant)
    assert b["settings"]["seqlen"] == 64 and b["settings"]["windows"] == b["settings"]["text_tokens"] // 64
    # 8-bit g64 is nearly lossless on a random model: same perplexity to 1%, tiny KL.
    assert abs(q["metrics"]["ppl"] / b["metrics"]["ppl"] - 1) < 0.01
    assert 0 <= q["metrics"]["kld"] < 1e-3


def test_max_ppl_gate_exits_5(tiny_llama, sample_text):
    proc = run_cli("eval-ppl", str(tiny_llama), "--dataset", str(sample_text), "--seqlen", "64", "--max-ppl", "1.0")
    assert proc.returncode == 5
    assert proc.stdout.startswith("ppl ")
    assert "exceeds --max-ppl" in proc.stderr


def test_non_finite_perplexity_fails_the_gate_and_json_stays_strict(tiny_llama, sample_text, tmp_path):
    """Broken weights (a NaN in the LM head) give a NaN perplexity: a warning, --max-ppl fails (exit 5),
    and --json prints strict JSON (null, not the bare NaN that JSON readers other than Python's reject)."""
    import shutil

    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    shutil.copytree(tiny_llama, broken)
    weights = next(broken.glob("*.safetensors"))
    tensors = load_file(weights)
    name = next(k for k in tensors if "embed" in k or "lm_head" in k)
    tensors[name][0, 0] = float("nan")
    tensors[name][:, 0] = float("nan")
    save_file(tensors, weights, metadata={"format": "pt"})
    proc = run_cli("eval-ppl", str(broken), "--dataset", str(sample_text), "--seqlen", "64", "--max-tokens", "256",
                   "--max-ppl", "1000", "--json")
    assert proc.returncode == 5, proc.stderr
    assert "not finite" in proc.stderr

    def no_constants(token: str):
        raise AssertionError(f"non-standard JSON constant {token} on stdout")

    res = json.loads(proc.stdout, parse_constant=no_constants)
    assert res["metrics"]["ppl"] is None and res["status"] == "gate_failed" and res["exit_code"] == 5
    plain = run_cli("eval-ppl", str(broken), "--dataset", str(sample_text), "--seqlen", "64", "--max-tokens", "256")
    assert plain.returncode == 0 and "not finite" in plain.stderr  # no gate: the measurement, with a warning


def test_dry_run_writes_nothing(tiny_llama, tmp_path):
    out = tmp_path / "never"
    proc = run_cli("quantize", str(tiny_llama), "-o", str(out), "--dry-run", "--json")
    assert proc.returncode == 0, proc.stderr
    plan = parse_json_stdout(proc)["plan"]
    assert plan["matched_linear_modules"] == 14 and plan["stages"][0]["method"] == "rtn"
    assert not out.exists()
    assert plan["parameters"] == stored_parameters(tiny_llama)
    text = run_cli("prune", "--method", "wanda", str(tiny_llama), "-o", str(out), "--dry-run").stdout
    assert "stage 0: wanda " in text and "calibration: dataset=" in text and f"output: {out}" in text
    assert "{" not in text and "True" not in text  # key=value, as a recipe spells it; no Python reprs


def stored_parameters(path) -> int:
    import math

    from safetensors import safe_open

    with safe_open(str(path / "model.safetensors"), "pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())


@pytest.mark.slow
def test_dry_run_counts_a_tied_lm_head_once():
    """The demo model ties its LM head to the embeddings: 134.5M parameters, not 162.8M."""
    from effllm_tools.io.demo import ensure_demo_checkpoint

    proc = run_cli("quantize", "demo", "-o", "never", "--dry-run", "--json")
    assert proc.returncode == 0, proc.stderr
    assert parse_json_stdout(proc)["plan"]["parameters"] == stored_parameters(ensure_demo_checkpoint())


def test_run_recipe_with_set_and_inspect(tiny_llama, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"version: 1\nmodel: {tiny_llama}\nstages:\n  - method: rtn\n    bits: 4\n")
    out = tmp_path / "r"
    proc = run_cli("run", str(recipe), "--set", "rtn.bits=3", "--set", "rtn.group_size=16", "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    info = parse_json_stdout(run_cli("inspect", str(out), "--json"))
    assert info["methods"] == ["rtn"] and info["quantization"]["bits"] == [3]
    report = run_cli("inspect", str(out)).stdout
    assert "rtn" in report and "avg_bits=" in report and "{" not in report  # key=value, no Python reprs


def test_output_loads_in_transformers_and_matches_dequantized_weights(tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM

    import effllm_tools
    from effllm_tools.methods.rtn.algorithm import dequantize_codes, quantize_rtn

    out = tmp_path / "q3"
    assert run_cli("quantize", "--bits", "3", "--group-size", "16", str(tiny_llama), "-o", str(out)).returncode == 0
    model = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    same = effllm_tools.load(out)
    dense = AutoModelForCausalLM.from_pretrained(str(tiny_llama)).eval()
    # The reference: replace every decoder linear by its RTN-dequantized weight in a dense model.
    with torch.no_grad():
        for name, mod in dense.named_modules():
            if isinstance(mod, torch.nn.Linear) and name.startswith("model.layers."):
                codes, s, z = quantize_rtn(mod.weight, 3, 16)
                mod.weight.copy_(dequantize_codes(codes, s, z, 16))
        ids = torch.randint(0, 256, (2, 24))
        ref = dense(ids).logits
        torch.testing.assert_close(model(ids).logits, ref, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(same(ids).logits, ref, rtol=1e-4, atol=1e-4)
    layer = model.model.layers[0].mlp.down_proj
    assert type(layer).__name__ == "RTNLinear"
    # Really packed: 3 bits per code, not one byte per code.
    assert layer.qweight.numel() * 32 == -(-layer.in_features * 3 // 32) * 32 * layer.out_features


def test_same_seed_same_bytes(tiny_llama, tmp_path):
    outs = [tmp_path / "a", tmp_path / "b"]
    for out in outs:
        assert run_cli("quantize", "--bits", "4", "--seed", "7", str(tiny_llama), "-o", str(out)).returncode == 0
    a, b = ((o / "model.safetensors").read_bytes() for o in outs)
    assert a == b


def test_max_ppl_gate_in_json_mode_prints_one_object(tiny_llama, sample_text):
    proc = run_cli("eval-ppl", str(tiny_llama), "--dataset", str(sample_text), "--seqlen", "64", "--max-tokens", "640",
                   "--max-ppl", "1.0", "--json")
    assert proc.returncode == 5
    res = parse_json_stdout(proc)
    assert res["status"] == "gate_failed" and res["gate"] == {"max_ppl": 1.0, "passed": False}
    assert res["exit_code"] == 5 and "exceeds --max-ppl" in res["error"]  # the keys of every failure's object
    assert "exceeds --max-ppl" in proc.stderr


@pytest.mark.parametrize("args", [("eval-ppl", "--max-ppl", "nan"), ("eval-ppl", "--max-ppl", "-1"),
                                  ("eval-passkey", "--min-accuracy", "nan"), ("eval-passkey", "--min-accuracy", "1.5")])
def test_gate_limits_must_be_finite_and_in_range(tiny_llama, args):
    """NaN passed every result (and wrote invalid JSON); an accuracy above 1 could never pass."""
    verb, *gate = args
    proc = run_cli(verb, str(tiny_llama), *gate, "--json")
    assert proc.returncode == 2, proc.stderr
    assert "must be a finite number" in parse_json_stdout(proc)["error"]


def test_saved_recipe_reruns_from_another_directory(tiny_llama, tmp_path):
    """The recipe saved beside an output names the model and the output by absolute paths, so that
    `effllm run OUT/effllm_recipe.yaml` works from any directory (paths were relative to the first run's)."""
    import shutil

    import yaml

    work = tmp_path / "work"
    work.mkdir()
    shutil.copytree(tiny_llama, work / "model")
    proc = run_cli("quantize", "--bits", "4", "--group-size", "32", "model", "-o", "q4", cwd=work)
    assert proc.returncode == 0, proc.stderr
    saved = yaml.safe_load((work / "q4" / "effllm_recipe.yaml").read_text())
    assert saved["model"] == str((work / "model").resolve()) and saved["output"]["path"] == str((work / "q4").resolve())
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc = run_cli("run", str(work / "q4" / "effllm_recipe.yaml"), "-o", "again", cwd=elsewhere)
    assert proc.returncode == 0, proc.stderr
    assert (elsewhere / "again" / "model.safetensors").is_file()


def test_saved_recipe_keeps_names_that_the_loaders_read_as_names(tmp_path, monkeypatch):
    """A named set or 'demo' stays a name in the saved recipe even when a same-named folder sits in the
    working directory (the loaders read the name there); a local file given as a path becomes absolute."""
    from types import SimpleNamespace

    from effllm_tools.runner import portable_recipe

    monkeypatch.chdir(tmp_path)
    for name in ("demo", "calib-mix", "austen-emma"):
        (tmp_path / name).mkdir()
    (tmp_path / "notes.txt").write_text("x")
    recipe = {"model": "demo", "calibration": {"dataset": "calib-mix"}, "output": {"path": "o"},
              "stages": [{"method": "longrope2", "dataset": "austen-emma"}, {"method": "rtn"}]}
    saved = portable_recipe(recipe, Path("o"), SimpleNamespace(kind="demo", path=tmp_path / "x", gguf_file=None))
    assert saved["model"] == "demo" and saved["calibration"]["dataset"] == "calib-mix"
    assert saved["stages"][0]["dataset"] == "austen-emma" and saved["output"]["path"] == str(tmp_path / "o")
    recipe["calibration"]["dataset"] = "./calib-mix"
    recipe["stages"][0]["dataset"] = "notes.txt"
    saved = portable_recipe(recipe, Path("o"), SimpleNamespace(kind="directory", path=tmp_path / "m", gguf_file=None))
    assert saved["model"] == str(tmp_path / "m") and saved["calibration"]["dataset"] == str(tmp_path / "calib-mix")
    assert saved["stages"][0]["dataset"] == str(tmp_path / "notes.txt") and "dataset" not in saved["stages"][1]
