"""The provenance record written into every output: what produced this checkpoint, how, where."""

from __future__ import annotations

import datetime
import hashlib
import importlib.metadata
import json
import platform
from typing import Any

import torch

import effllm_tools

PACKAGES = ("torch", "transformers", "triton", "safetensors", "accelerate", "gguf", "typer", "pyyaml")


def package_versions() -> dict[str, str]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def device_description(device: str) -> dict[str, Any]:
    info: dict[str, Any] = {"device": device, "host": platform.machine(), "python": platform.python_version()}
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
        info["cuda"] = torch.version.cuda
    else:
        info["cpu"] = platform.processor() or platform.machine()
        info["threads"] = torch.get_num_threads()
    return info


def recipe_hash(recipe: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(recipe, sort_keys=True, default=str).encode()).hexdigest()


def base_record(device: str) -> dict[str, Any]:
    return {
        "effllm_version": effllm_tools.__version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "packages": package_versions(),
        "machine": device_description(device),
    }
