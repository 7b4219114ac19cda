"""The runner: several stages in one process, one output, provenance of every stage."""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch

from effllm_tools.recipe import parse_recipe
from effllm_tools.registry import MethodSpec, StageResult, register_method


@dataclass
class _ZeroFirstColumnConfig:
    column: int = 0


def _zero_column(ctx, cfg):
    """A test-only dense stage (registered by this test, not shipped): zero one input column."""
    with torch.no_grad():
        for name, mod in ctx.model.named_modules():
            if isinstance(mod, torch.nn.Linear) and name.startswith(ctx.layers_prefix + "."):
                mod.weight[:, cfg.column] = 0
    return StageResult(metrics={"zeroed_column": cfg.column})


def test_two_stages_one_process_no_intermediates(tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM

    from effllm_tools.runner import run_recipe

    register_method(MethodSpec("test-zero-column", "prune", "prune", "test only", config=_ZeroFirstColumnConfig,
                               apply=_zero_column))
    out = tmp_path / "out"
    recipe = parse_recipe({"model": str(tiny_llama), "stages": [{"method": "test-zero-column", "column": 3},
                                                                 {"method": "rtn", "bits": 8, "group_size": 32}],
                           "output": {"path": str(out)}})
    res = run_recipe(recipe, device="cpu")
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # nothing but the final output
    assert [st["method"] for st in res["stages"]] == ["test-zero-column", "rtn"]
    prov = json.loads((out / "effllm_provenance.json").read_text())
    assert prov["stages"][0]["metrics"] == {"zeroed_column": 3}
    import effllm_tools  # noqa: F401

    model = AutoModelForCausalLM.from_pretrained(str(out))
    w = model.model.layers[0].self_attn.q_proj.dequantized()
    # The prune stage ran before the quantizer: the zeroed column stays (near) zero after 8-bit RTN.
    assert w[:, 3].abs().max() < 2e-2 * w.abs().max()
