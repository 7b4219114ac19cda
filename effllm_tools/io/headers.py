"""Cheap integrity checks on weight files: read headers and sizes, never the tensors."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

from effllm_tools.errors import BadInputError


def read_safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file, without reading tensors; errors name the file."""
    try:
        with path.open("rb") as fh:
            raw = fh.read(8)
            if len(raw) < 8:
                raise BadInputError(f"{path}: truncated safetensors file (no header)")
            (n,) = struct.unpack("<Q", raw)
            size = path.stat().st_size
            if n > size - 8:
                raise BadInputError(f"{path}: corrupt safetensors header (length {n} beyond file size {size})")
            header = json.loads(fh.read(n))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BadInputError(f"{path}: corrupt safetensors header ({err})") from None
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise BadInputError(f"{path}: truncated safetensors file ({size} bytes, header needs {8 + n + end})")
    return header


def check_safetensors_files(directory: Path) -> None:
    """Every ``*.safetensors`` file in ``directory`` has a sound header and all its bytes."""
    for f in sorted(directory.glob("*.safetensors")):
        read_safetensors_header(f)
