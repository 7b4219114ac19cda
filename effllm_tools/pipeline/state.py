"""Per-layer resume state of a layer-wise calibration (ecosystem.md A4.3, GPTQModel PR #3057).

Layout of ``state_dir``::

    state.json                   {"format", "fingerprint", "finished_layers", "num_layers",
                                  "num_samples", "hidden_states"}
    layer_00000.safetensors      layer 0 after calibration: "layer.<param>" weights and
                                 "artifact.<key>" tensors the method left in ctx.artifacts
    ...
    hidden_00003.safetensors     "sample.<s>": the hidden states [1, L, hidden] feeding layer 3

Every file is written to a temporary name and renamed, and ``state.json`` is renamed last, so a
crash at any point leaves the previous consistent state. Only the latest hidden states are kept.
The fingerprint (model + data + method config, see :func:`make_fingerprint`) guards against
resuming someone else's state, which would silently mix weights of two runs.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from effllm_tools.errors import BadInputError

STATE_FORMAT = "effllm-layerwise/1"
STATE_FILE = "state.json"


def make_fingerprint(model: Any, calib_ids: torch.Tensor, config: Any = None) -> str:
    """sha256 of the model's config and name, the calibration ids ``[n, L]`` and a method config.

    ``config`` is anything ``json.dumps`` can write (sorted keys; other objects through ``str``):
    include every setting that changes the result, or a resumed run may mix two configurations.
    """
    digest = hashlib.sha256()
    model_config = getattr(model, "config", None)
    if model_config is not None:
        digest.update(model_config.to_json_string(use_diff=False).encode())
        digest.update(str(getattr(model_config, "name_or_path", "")).encode())
    ids = calib_ids.detach().to("cpu", torch.long).contiguous()
    digest.update(str(tuple(ids.shape)).encode())
    digest.update(ids.numpy().tobytes())
    digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    return digest.hexdigest()


@dataclass
class ResumePoint:
    """What a resumed run continues from."""

    finished_layers: int
    hidden_states: list[torch.Tensor]  # feeding layer ``finished_layers``, each [1, L, hidden], CPU
    layer_tensors: list[dict[str, torch.Tensor]]  # per finished layer: its state_dict
    artifacts: list[dict[str, torch.Tensor]]  # per finished layer: the method's artifacts


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path, *, clone: bool = False) -> None:
    """Write ``tensors`` to ``path`` through a temporary file; ``clone`` unties shared storage."""
    tmp = path.with_name(path.name + ".tmp")
    host = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    save_file({k: v.clone() for k, v in host.items()} if clone else host, str(tmp))
    os.replace(tmp, path)


def _atomic_write_json(data: dict[str, Any], path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _layer_file(index: int) -> str:
    return f"layer_{index:05d}.safetensors"


def _hidden_file(index: int) -> str:
    return f"hidden_{index:05d}.safetensors"


class LayerwiseState:
    """Reads and writes the resume state of one run in ``state_dir``."""

    def __init__(self, state_dir: str | os.PathLike[str], fingerprint: str, num_layers: int) -> None:
        self.dir = Path(state_dir)
        self.fingerprint = fingerprint
        self.num_layers = num_layers

    def clear(self) -> None:
        """Start afresh: remove this pipeline's files (and only those) from ``state_dir``."""
        self.dir.mkdir(parents=True, exist_ok=True)
        for pattern in (STATE_FILE, "layer_*.safetensors", "hidden_*.safetensors", "*.tmp"):
            for path in self.dir.glob(pattern):
                path.unlink()

    def save(
        self,
        index: int,
        layer_state: dict[str, torch.Tensor],
        artifacts: dict[str, torch.Tensor],
        hidden_states: list[torch.Tensor],
    ) -> None:
        """Record that layer ``index`` is finished; ``hidden_states`` feed layer ``index + 1``."""
        tensors = {f"layer.{k}": v for k, v in layer_state.items()}
        tensors.update({f"artifact.{k}": v for k, v in artifacts.items()})
        _atomic_save(tensors, self.dir / _layer_file(index), clone=True)
        hidden_name = _hidden_file(index + 1)
        _atomic_save({f"sample.{s}": h for s, h in enumerate(hidden_states)}, self.dir / hidden_name)
        record = {
            "format": STATE_FORMAT,
            "fingerprint": self.fingerprint,
            "finished_layers": index + 1,
            "num_layers": self.num_layers,
            "num_samples": len(hidden_states),
            "hidden_states": hidden_name,
        }
        _atomic_write_json(record, self.dir / STATE_FILE)
        for old in self.dir.glob("hidden_*.safetensors"):
            if old.name != hidden_name:
                old.unlink()

    def _read_record(self) -> dict[str, Any] | None:
        path = self.dir / STATE_FILE
        if not path.exists():
            return None
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise BadInputError(f"{path}: unreadable resume state ({err})") from err
        if not isinstance(record, dict) or record.get("format") != STATE_FORMAT:
            raise BadInputError(f"{path}: not an effllm layer-wise resume state")
        return record

    def load(self, num_samples: int) -> ResumePoint | None:
        """The saved point to continue from; None when ``state_dir`` holds no state yet.

        Raises:
            BadInputError: the state belongs to another run (fingerprint, layer or sample count
                differ) or its files are missing or corrupt.
        """
        record = self._read_record()
        if record is None:
            return None
        if record.get("fingerprint") != self.fingerprint:
            raise BadInputError(
                f"{self.dir}: resume state belongs to another run (model, data or settings differ); "
                "remove it or run without resume"
            )
        if record.get("num_layers") != self.num_layers or record.get("num_samples") != num_samples:
            raise BadInputError(f"{self.dir}: resume state does not match this model and data")
        finished = int(record["finished_layers"])
        try:
            hidden = load_file(str(self.dir / record["hidden_states"]))
            layer_files = [load_file(str(self.dir / _layer_file(i))) for i in range(finished)]
        except (OSError, SafetensorError) as err:
            raise BadInputError(f"{self.dir}: resume state is incomplete or corrupt ({err})") from err
        if len(hidden) != num_samples:
            raise BadInputError(f"{self.dir}: resume state holds {len(hidden)} samples, not {num_samples}")
        return ResumePoint(
            finished_layers=finished,
            hidden_states=[hidden[f"sample.{s}"] for s in range(num_samples)],
            layer_tensors=[_strip(f, "layer.") for f in layer_files],
            artifacts=[_strip(f, "artifact.") for f in layer_files],
        )


def _strip(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
