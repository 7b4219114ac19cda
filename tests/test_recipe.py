"""Recipe validation: every error names the key, before any weight loads."""

from __future__ import annotations

import pytest

from effllm_tools.errors import BadInputError, UnsupportedError
from effllm_tools.recipe import apply_override, load_recipe_file, parse_recipe


def _raw(**over):
    raw = {"version": 1, "model": "demo", "stages": [{"method": "rtn", "bits": 4, "group_size": 64}],
           "output": {"path": "out"}}
    raw.update(over)
    return raw


def test_valid_recipe_round_trips():
    r = parse_recipe(_raw())
    assert r.stages[0].config.bits == 4 and r.stages[0].config.group_size == 64
    again = parse_recipe(r.to_dict())
    assert again.to_dict() == r.to_dict()


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        (_raw(colour="red"), "unknown key 'colour'"),
        (_raw(stages=[{"method": "rtn", "bitz": 4}]), "unknown key 'bitz'"),
        (_raw(stages=[{"method": "rtn", "bits": "four"}]), "stages[0].bits: expected int"),
        (_raw(stages=[{"method": "rtn", "bits": True}]), "stages[0].bits: expected int"),
        (_raw(stages=[{"method": "rtn", "bits": 9}]), "bits must be between 2 and 8"),
        (_raw(stages=[]), "'stages' must be a non-empty list"),
        (_raw(version=7), "version 7"),
        (_raw(calibration={"nsamples": "many"}), "calibration.nsamples: expected int"),
        (_raw(calibration={"sets": 3}), "unknown key 'sets'"),
        (_raw(seed="x"), "'seed' must be an integer"),
    ],
)
def test_bad_recipes_name_the_key(raw, needle):
    with pytest.raises(BadInputError) as err:
        parse_recipe(raw)
    assert needle in str(err.value)
    assert "\n" not in str(err.value)


def test_unknown_methods_are_bad_input_and_unavailable_ones_unsupported():
    with pytest.raises(BadInputError, match=r"stages\[0\]: unknown method 'nope'"):
        parse_recipe(_raw(stages=[{"method": "nope"}]))
    with pytest.raises(UnsupportedError, match="not available"):
        parse_recipe(_raw(stages=[{"method": "quarot"}]))


def test_order_rules():
    from effllm_tools.recipe import Stage, validate_order
    from effllm_tools.registry import MethodSpec

    def st(name, kind):
        return Stage(name, MethodSpec(name, "quantize", kind, ""), None)

    with pytest.raises(BadInputError, match="two weight quantizers"):
        validate_order([st("a", "weight-quant"), st("b", "weight-quant")], "r")
    with pytest.raises(BadInputError, match="cannot come after"):
        validate_order([st("s", "sparsify-attn"), st("e", "extend-context")], "r")
    with pytest.raises(BadInputError, match="cannot come after"):
        validate_order([st("q", "weight-quant"), st("p", "prune")], "r")
    validate_order([st("e", "extend-context"), st("p", "prune"), st("q", "weight-quant")], "r")


def test_set_overrides_by_index_and_by_method_name():
    raw = _raw()
    apply_override(raw, "stages.0.bits=3")
    assert raw["stages"][0]["bits"] == 3
    apply_override(raw, "rtn.group_size=32")
    assert raw["stages"][0]["group_size"] == 32
    apply_override(raw, "calibration.nsamples=16")
    assert raw["calibration"]["nsamples"] == 16
    with pytest.raises(BadInputError, match="expected key=value"):
        apply_override(raw, "bits")
    with pytest.raises(BadInputError, match="not valid YAML"):
        apply_override(raw, 'rtn.ignore=["\\."]')  # a backslash escape YAML refuses inside double quotes
    with pytest.raises(BadInputError, match="the recipe has no gptq stage \\(its stages: rtn\\)"):
        apply_override(raw, "gptq.bits=3")  # a method the recipe does not run (was "unknown key 'gptq'")


def test_exponent_floats_that_yaml_reads_as_strings():
    """PyYAML reads 1e-4 as a string; a float key still takes it (--set wanda++.ro_lr=1e-4)."""
    raw = {"version": 1, "model": "m", "stages": [{"method": "wanda++", "sparsity": "2:4"}]}
    apply_override(raw, "wanda++.ro_lr=1e-4")
    assert raw["stages"][0]["ro_lr"] == "1e-4"  # what YAML gives
    assert parse_recipe(raw).stages[0].config.ro_lr == 1e-4
    apply_override(raw, "wanda++.ro_lr=fast")
    with pytest.raises(BadInputError, match="ro_lr: expected float"):
        parse_recipe(raw)


def test_recipe_file_errors(tmp_path):
    with pytest.raises(BadInputError, match="no such recipe file"):
        load_recipe_file(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("stages: [\n")
    with pytest.raises(BadInputError, match="invalid YAML"):
        load_recipe_file(bad)


def test_shipped_recipes_validate():
    from pathlib import Path

    recipes = sorted((Path(__file__).parents[1] / "recipes").glob("*.yaml"))
    assert recipes
    for path in recipes:
        load_recipe_file(path)
