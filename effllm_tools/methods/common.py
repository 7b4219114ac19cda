"""Helpers every method shares: which linears a stage touches, swapping modules, checking keys."""

from __future__ import annotations

import re

from torch import nn

from effllm_tools.errors import BadInputError


def check_ignore_patterns(method: str, patterns: list[str]) -> None:
    """The ``ignore`` recipe key: every entry must compile as a regex (exit 2 naming it otherwise)."""
    for pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as err:
            raise BadInputError(f"{method}: ignore pattern {pattern!r} is not a valid regex: {err}") from None


def target_linears(model: nn.Module, layers_prefix: str, ignore: list[str]) -> dict[str, nn.Linear]:
    """Every nn.Linear inside the decoder layers, minus the ignored names."""
    found = {}
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and name.startswith(layers_prefix + "."):
            if not any(re.search(p, name) for p in ignore):
                found[name] = mod
    return found


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
