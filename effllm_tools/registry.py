"""The method and format registries: recipes name these keys, never import paths.

A *method* transforms a model (one recipe stage). A *format* is a packed module type that a
method writes into checkpoints; loaders rebuild modules from ``quantization_config`` by format name.
Methods that are planned but not built are registered as unavailable so the CLI can list them and
refuse them with exit 4 instead of pretending.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from effllm_tools.errors import BadInputError, UnsupportedError

VERBS = ("quantize", "quantize-kv", "prune", "extend-context", "sparsify-attn")

# Stage kinds and the order they must appear in (see recipe.validate_order).
KIND_ORDER = ("extend-context", "rotate", "prune", "weight-quant", "kv-quant", "sparsify-attn")


@dataclass(frozen=True)
class MethodSpec:
    """What a recipe stage may name."""

    name: str
    verb: str  # the CLI verb that runs it
    kind: str  # one of KIND_ORDER; two stages of kind "weight-quant" are an error
    summary: str
    config: type | None = None  # a dataclass whose fields are exactly the recipe keys
    apply: Callable[..., Any] | None = None  # apply(model_ctx, config) -> dict of metrics
    needs_calibration: bool = False
    available: bool = True
    paper: str = ""

    def keys(self) -> dict[str, dataclasses.Field]:
        return {f.name: f for f in dataclasses.fields(self.config)} if self.config else {}


_METHODS: dict[str, MethodSpec] = {}
_FORMATS: dict[str, type] = {}


def register_method(spec: MethodSpec) -> MethodSpec:
    if spec.verb not in VERBS or spec.kind not in KIND_ORDER:
        raise ValueError(f"bad registration for {spec.name}: verb {spec.verb}, kind {spec.kind}")
    _METHODS[spec.name] = spec
    return spec


def register_format(name: str) -> Callable[[type], type]:
    def deco(cls: type) -> type:
        _FORMATS[name] = cls
        return cls

    return deco


def _load_builtin() -> None:
    # Importing the method packages registers them.
    from effllm_tools.methods import catalog  # noqa: F401


def all_methods() -> dict[str, MethodSpec]:
    _load_builtin()
    return dict(_METHODS)


def get_method(name: str, verb: str | None = None) -> MethodSpec:
    methods = all_methods()
    spec = methods.get(name)
    if spec is None or (verb is not None and spec.verb != verb):
        scope = [m.name for m in methods.values() if verb is None or m.verb == verb]
        where = f" for {verb}" if verb else ""
        raise BadInputError(f"unknown method '{name}'{where}; known: {', '.join(sorted(scope))}")  # a typo: exit 2
    if not spec.available:
        ready = [m.name for m in methods.values() if m.verb == spec.verb and m.available]
        raise UnsupportedError(
            f"method '{name}' ({spec.summary}) is not available in this version of effllm; "
            f"available for {spec.verb}: {', '.join(ready) or 'none yet'}"
        )
    return spec


def get_format(name: str) -> type:
    _load_builtin()
    if name not in _FORMATS:
        raise UnsupportedError(f"checkpoint uses effllm format '{name}', unknown to this version of effllm")
    return _FORMATS[name]


@dataclass
class StageResult:
    """What one stage reports: metrics go to the JSON result and the provenance record."""

    metrics: dict[str, Any] = field(default_factory=dict)
