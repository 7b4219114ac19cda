"""Versioned YAML recipes: the model, calibration data, ordered stages, the output.

Validated completely before any weight is loaded; every error names the offending key.

    version: 1
    model: demo
    calibration: {dataset: calib-mix, nsamples: 128, seqlen: 512}
    seed: 0
    stages:
      - method: rtn
        bits: 4
        group_size: 64
    output: {path: out/rtn4, overwrite: false}
"""

from __future__ import annotations

import copy
import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from effllm_tools.errors import BadInputError
from effllm_tools.registry import KIND_ORDER, MethodSpec, all_methods, get_method

RECIPE_VERSION = 1
TOP_KEYS = {"version", "name", "description", "model", "calibration", "seed", "stages", "output"}
CALIBRATION_DEFAULTS = {"dataset": "calib-mix", "nsamples": 128, "seqlen": 512, "field": "text"}
CALIBRATION_TYPES = {"dataset": str, "nsamples": int, "seqlen": int, "field": str}
OUTPUT_DEFAULTS = {"path": None, "overwrite": False}


@dataclass
class Stage:
    method: str
    spec: MethodSpec
    config: Any  # instance of spec.config

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, **dataclasses.asdict(self.config)}


@dataclass
class Recipe:
    model: str | None
    stages: list[Stage]
    calibration: dict[str, Any] = field(default_factory=lambda: dict(CALIBRATION_DEFAULTS))
    seed: int = 0
    output: dict[str, Any] = field(default_factory=lambda: dict(OUTPUT_DEFAULTS))
    name: str | None = None

    @property
    def needs_calibration(self) -> bool:
        return any(st.spec.needs_calibration for st in self.stages)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"version": RECIPE_VERSION}
        if self.name:
            d["name"] = self.name
        d.update(model=self.model, calibration=dict(self.calibration), seed=self.seed,
                 stages=[st.to_dict() for st in self.stages], output=dict(self.output))
        return d


def load_recipe_file(path: Path, overrides: list[str] | None = None) -> Recipe:
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise BadInputError(f"{path}: no such recipe file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise BadInputError(f"{path}: cannot read recipe ({err})") from None
    except yaml.YAMLError as err:
        where = getattr(err, "problem_mark", None)
        at = f" at line {where.line + 1}" if where else ""
        raise BadInputError(f"{path}: invalid YAML{at}") from None
    if not isinstance(raw, dict):
        raise BadInputError(f"{path}: a recipe is a YAML mapping with keys {sorted(TOP_KEYS)}")
    for item in overrides or []:
        apply_override(raw, item)
    return parse_recipe(raw, source=str(path))


def apply_override(raw: dict[str, Any], item: str) -> None:
    """``--set a.b=c``: a dotted path into the recipe; a stage is named by index or method name."""
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise BadInputError(f"--set {item!r}: expected key=value, e.g. stages.0.bits=3 or rtn.bits=3")
    parts = key.split(".")
    stages = raw.get("stages") if isinstance(raw.get("stages"), list) else []
    named = [i for i, st in enumerate(stages) if isinstance(st, dict) and st.get("method") == parts[0]]
    if named and len(parts) > 1:
        parts = ["stages", str(named[0]), *parts[1:]]
    elif len(parts) > 1 and parts[0] not in TOP_KEYS and parts[0] in all_methods():
        have = ", ".join(str(st.get("method")) for st in stages if isinstance(st, dict)) or "none"
        raise BadInputError(f"--set {key}: the recipe has no {parts[0]} stage (its stages: {have})")
    node: Any = raw
    for part in parts[:-1]:
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise BadInputError(f"--set {key}: no element {part!r} (there are {len(node)})")
            node = node[int(part)]
        else:
            node = node.setdefault(part, {})
        if not isinstance(node, dict | list):
            raise BadInputError(f"--set {key}: {part!r} is not a mapping")
    try:
        parsed = yaml.safe_load(value) if value else ""
    except yaml.YAMLError as exc:
        problem = str(getattr(exc, "problem", None) or exc).splitlines()[0]
        raise BadInputError(f"--set {key}: the value {value!r} is not valid YAML ({problem})") from exc
    if isinstance(node, list):
        raise BadInputError(f"--set {key}: cannot set a list element")
    node[parts[-1]] = parsed


def parse_recipe(raw: dict[str, Any], source: str = "recipe") -> Recipe:
    unknown = set(raw) - TOP_KEYS
    if unknown:
        raise BadInputError(f"{source}: unknown key '{sorted(unknown)[0]}' (allowed: {', '.join(sorted(TOP_KEYS))})")
    version = raw.get("version", RECIPE_VERSION)
    if version != RECIPE_VERSION:
        hint = " (an integer, not a string)" if str(version) == str(RECIPE_VERSION) else ""
        raise BadInputError(f"{source}: version {version!r} is not supported{hint}; this effllm reads version: "
                            f"{RECIPE_VERSION}")
    model = raw.get("model")
    if model is not None and not isinstance(model, str):
        raise BadInputError(f"{source}: 'model' must be a string (path, GGUF file, hub id or 'demo')")
    stages_raw = raw.get("stages")
    if not isinstance(stages_raw, list) or not stages_raw:
        raise BadInputError(f"{source}: 'stages' must be a non-empty list of {{method: ..., <keys>}}")
    stages = [_parse_stage(st, f"{source}: stages[{i}]") for i, st in enumerate(stages_raw)]
    validate_order(stages, source)
    calibration = _merge_checked(raw.get("calibration"), CALIBRATION_DEFAULTS, CALIBRATION_TYPES, f"{source}: calibration")
    output = _merge_checked(raw.get("output"), OUTPUT_DEFAULTS, {"path": str, "overwrite": bool}, f"{source}: output")
    seed = raw.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**63:
        raise BadInputError(f"{source}: 'seed' must be an integer in [0, 2**63), got {seed!r}")
    if output.get("path"):  # "~/out": the output and its state folder beside it both under $HOME
        output = {**output, "path": str(Path(output["path"]).expanduser())}
    return Recipe(model, stages, calibration, seed, output, raw.get("name"))


def _merge_checked(value: Any, defaults: dict, types: dict, where: str) -> dict[str, Any]:
    if value is None:
        return dict(defaults)
    if not isinstance(value, dict):
        raise BadInputError(f"{where}: must be a mapping")
    for k, v in value.items():
        if k not in types:
            raise BadInputError(f"{where}: unknown key '{k}' (allowed: {', '.join(types)})")
        if not (v is None and defaults.get(k) is None) and not _is_type(v, types[k]):  # null only where it is the default
            raise BadInputError(f"{where}.{k}: expected {types[k].__name__}, got {v!r}")
        if types[k] is int and v is not None and v < 1:
            raise BadInputError(f"{where}.{k}: must be at least 1, got {v!r}")
    return {**defaults, **value}


def _parse_stage(raw: Any, where: str) -> Stage:
    if not isinstance(raw, dict) or "method" not in raw:
        raise BadInputError(f"{where}: a stage is a mapping with a 'method' key")
    try:
        spec = get_method(str(raw["method"]))  # a typo is bad input (exit 2); planned, not built: exit 4
    except BadInputError as err:
        raise BadInputError(f"{where}: {err}") from None
    params = {k: v for k, v in raw.items() if k != "method"}
    fields = spec.keys()
    hints = typing.get_type_hints(spec.config) if spec.config else {}
    for k, v in list(params.items()):
        if k not in fields:
            raise BadInputError(f"{where}: unknown key '{k}' for method '{spec.name}' (allowed: {', '.join(fields)})")
        params[k] = v = _coerce_float(v, hints[k])
        if not _is_type(v, hints[k]):
            raise BadInputError(f"{where}.{k}: expected {_type_name(hints[k])}, got {v!r}")
    config = spec.config(**copy.deepcopy(params))
    if hasattr(config, "validate"):
        try:
            config.validate()
        except BadInputError as err:
            raise BadInputError(f"{where}: {err}") from None
    return Stage(spec.name, spec, config)


def validate_order(stages: list[Stage], source: str) -> None:
    """Stages must follow KIND_ORDER, and there is at most one weight quantizer and one context extension."""
    ranks = [KIND_ORDER.index(st.spec.kind) for st in stages]
    for i in range(1, len(stages)):
        if ranks[i] < ranks[i - 1]:
            raise BadInputError(
                f"{source}: stages[{i}] ({stages[i].method}, {stages[i].spec.kind}) cannot come after "
                f"{stages[i - 1].method} ({stages[i - 1].spec.kind}); order: {' < '.join(KIND_ORDER)}"
            )
    quant = [st.method for st in stages if st.spec.kind == "weight-quant"]
    if len(quant) > 1:
        raise BadInputError(f"{source}: two weight quantizers ({', '.join(quant)}); a recipe may have one")
    extend = [st.method for st in stages if st.spec.kind == "extend-context"]
    if len(extend) > 1:  # the second would find the first's RoPE scaling and refuse it after loading
        raise BadInputError(f"{source}: two context extensions ({', '.join(extend)}); a recipe may have one")


def _coerce_float(value: Any, tp: Any) -> Any:
    """YAML 1.1 (PyYAML) reads ``1e-4`` as a string (it wants ``1.0e-4``): for a key that takes a
    float and no string, a string that Python reads as a number is that number."""
    if isinstance(value, str) and _is_type(1.5, tp) and not _is_type("x", tp):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _is_type(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return any(_is_type(value, a) for a in typing.get_args(tp))
    if origin is list:
        (inner,) = typing.get_args(tp) or (Any,)
        return isinstance(value, list) and all(_is_type(v, inner) for v in value)
    if tp is Any:
        return True
    if tp is type(None):
        return value is None
    if tp is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))
