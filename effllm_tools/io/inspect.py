"""``effllm inspect``: what a checkpoint holds, read from its config, provenance and tensor headers."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from effllm_tools.errors import BadInputError
from effllm_tools.io.headers import read_safetensors_header
from effllm_tools.io.save import PROVENANCE_FILE
from effllm_tools.reporting import key_values, text_value


def _json_object(f: Path) -> dict[str, Any]:
    """A JSON file that must hold an object (exit 2 naming the file otherwise)."""
    try:
        value = json.loads(f.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BadInputError(f"{f}: cannot read it as JSON ({str(err).splitlines()[0][:160]})") from None
    if not isinstance(value, dict):
        raise BadInputError(f"{f}: expected a JSON object, found {type(value).__name__}")
    return value


def inspect_checkpoint(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise BadInputError(f"{path}: no such file or directory")
    if not path.is_dir() or not (path / "config.json").is_file():
        raise BadInputError(f"{path}: not a checkpoint directory (no config.json; inspect reads effllm's and "
                            "transformers' folders, not a .gguf file)")
    config = _json_object(path / "config.json")
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise BadInputError(f"{path}: no *.safetensors weights next to config.json")
    dtypes: Counter[str] = Counter()
    tensors = 0
    for f in files:
        for name, meta in read_safetensors_header(f).items():
            if name != "__metadata__":
                tensors += 1
                dtypes[meta["dtype"]] += 1
    prov_path = path / PROVENANCE_FILE
    provenance = _json_object(prov_path) if prov_path.is_file() else None
    qc = config.get("quantization_config") or {}
    modules = qc.get("modules", {}) if qc.get("quant_method") == "effllm" else {}
    bits = sorted({m.get("bits") for m in modules.values() if "bits" in m})
    return {
        "path": str(path.resolve()),
        "model_type": config.get("model_type"),
        "architectures": config.get("architectures"),
        "methods": [st.get("method") for st in _all_stages(provenance)],
        "chain": [{"method": st.get("method"), "config": st.get("config"), "metrics": st.get("metrics")}
                  for st in _all_stages(provenance)],  # every stage of every command, oldest first
        "quantization": {"quant_method": qc.get("quant_method"), "modules": len(modules), "bits": bits,
                         "formats": sorted({m.get("format") for m in modules.values()}),
                         "avg_bits": _avg_bits(modules, provenance)} if qc else None,
        "metrics": provenance.get("metrics") if provenance else None,
        "sparsity": _sparsity(provenance),
        "rope_scaling": config.get("rope_scaling") or config.get("rope_parameters"),
        "max_position_embeddings": config.get("max_position_embeddings"),
        "files": [f.name for f in files],
        "size_bytes": sum(f.stat().st_size for f in files),
        "tensors": tensors,
        "tensor_dtypes": dict(dtypes),
        "provenance": {k: provenance.get(k) for k in ("effllm_version", "created", "source", "seed", "data",
                                                       "recipe_sha256", "machine", "packages")} if provenance else None,
    }


def _avg_bits(modules: dict[str, dict[str, Any]], provenance: dict[str, Any] | None) -> float | None:
    """Bits per quantized parameter: from the module specs that record it (``spqr``), weighted by
    parameter count, else the ``avg_bits`` metric the quantizing stage wrote into the provenance."""
    sized = [(m["avg_bits"], m["in_features"] * m["out_features"]) for m in modules.values()
             if "avg_bits" in m and "in_features" in m and "out_features" in m]
    if sized and len(sized) == len(modules):
        return sum(b * n for b, n in sized) / max(sum(n for _, n in sized), 1)
    recorded = ((provenance or {}).get("metrics") or {}).get("avg_bits")
    for stage in _all_stages(provenance):  # a chain: the quantizing stage ran in an earlier command
        recorded = (stage.get("metrics") or {}).get("avg_bits", recorded)
    return recorded


def _all_stages(provenance: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Every stage the checkpoint went through, oldest first: the earlier commands' (``history``), then
    this output's."""
    return [*(provenance or {}).get("history", []), *(provenance or {}).get("stages", [])]


def _sparsity(provenance: dict[str, Any] | None) -> dict[str, Any] | None:
    """The measured weight sparsity a pruning stage recorded in the provenance, this command's or an
    earlier one's in a chain (the last one wins)."""
    found = None
    for stage in _all_stages(provenance):
        m = stage.get("metrics") or {}
        if "weight_sparsity" in m:
            found = {"method": stage.get("method"), "pattern": m.get("sparsity_pattern"),
                     "weight_sparsity": m["weight_sparsity"], "pruned_modules": m.get("pruned_modules"),
                     "by_type": m.get("weight_sparsity_by_type"), "per_layer": m.get("weight_sparsity_per_layer"),
                     "zeros_kept": 1.0, "lost_by": []}
        elif found and m.get("input_exact_zeros"):  # a later stage that may have filled the pruned weights
            kept = m.get("exact_zeros_kept", 0) / m["input_exact_zeros"]
            found["zeros_kept"] *= kept
            if kept < 0.999:
                found["lost_by"].append(stage.get("method"))
    return found


def _render_sparsity(s: dict[str, Any] | None) -> str:
    if not s:
        return "sparsity:    none recorded"
    line = (f"sparsity:    {s['weight_sparsity']:.2%} zeros in {s['pruned_modules']} pruned modules "
            f"({s['pattern']}, {s['method']}); by type {s['by_type']}")
    if s.get("lost_by"):
        line += (f"; NOT KEPT: {', '.join(s['lost_by'])} kept {s['zeros_kept']:.2%} of the exact zeros, "
                 "so the weights are no longer sparse")
    return line


def render_inspection(info: dict[str, Any]) -> str:
    q = info["quantization"]
    rope = info["rope_scaling"]
    lines = [
        f"path:        {info['path']}",
        f"model:       {info['model_type']} ({', '.join(info['architectures'] or []) or 'no architectures'})",
        f"methods:     {', '.join(info['methods']) or 'none recorded'}",
        (f"quantized:   {q['modules']} modules, bits {text_value(q['bits'])}, formats {', '.join(q['formats'])}"
         + (f", {q['avg_bits']:.4f} average bits per parameter" if q.get("avg_bits") is not None else "")
         if q else "quantized:   no"),
        f"metrics:     {key_values(info['metrics'])}" if info["metrics"] else "metrics:     none recorded",
        _render_sparsity(info.get("sparsity")),
        f"rope:        {key_values(rope) if isinstance(rope, dict) else rope} (max positions {info['max_position_embeddings']})",
        f"size:        {info['size_bytes'] / 1e6:.1f} MB in {len(info['files'])} file(s), {info['tensors']} tensors "
        f"({key_values(info['tensor_dtypes'])})",
    ]
    p = info["provenance"]
    if p:
        src = p["source"]
        src = src.get("path") or src.get("spec") if isinstance(src, dict) else src
        lines.append(f"provenance:  effllm {p['effllm_version']}, {p['created']}, from {src}, seed {p['seed']}")
    return "\n".join(lines)
