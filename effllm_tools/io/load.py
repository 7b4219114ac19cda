"""Open whatever MODEL names: a transformers directory, a GGUF file, a hub id, or ``demo``."""

from __future__ import annotations

import contextlib
import json
import logging
import re
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from effllm_tools.errors import BadInputError, UnsupportedError
from effllm_tools.io.headers import check_safetensors_files

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class ModelSource:
    """Where a model came from (recorded in provenance)."""

    spec: str
    kind: str  # "directory" | "gguf" | "hub" | "demo"
    path: Path | None
    gguf_file: str | None = None

    @property
    def input_path(self) -> Path | None:
        """The file or directory that must never be written to."""
        if self.path is None:
            return None
        return self.path / self.gguf_file if self.gguf_file else self.path

    def describe(self) -> dict[str, Any]:
        return {"spec": self.spec, "kind": self.kind, "path": str(self.path) if self.path else None}


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    source: ModelSource
    info: dict[str, Any] = field(default_factory=dict)


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    if name is None or isinstance(name, torch.dtype) or name == "auto":
        return name if isinstance(name, torch.dtype) else None
    if name not in DTYPES:
        raise BadInputError(f"unknown --dtype {name!r}; use auto, float32, bfloat16 or float16")
    return DTYPES[name]


def resolve_source(spec: str) -> ModelSource:
    """Classify MODEL without loading weights; missing paths are errors (exit 2)."""
    if not spec.strip():  # e.g. an unset shell variable or a failed $(...) in a chain
        raise BadInputError("empty MODEL argument (an unset variable, or an earlier command in a chain that failed?)")
    if spec == "demo":
        from effllm_tools.io.demo import ensure_demo_checkpoint

        return ModelSource(spec, "demo", ensure_demo_checkpoint())
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise BadInputError(f"{spec}: directory has no config.json (not a transformers checkpoint)")
        return ModelSource(spec, "directory", path.resolve())
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise BadInputError(f"{spec}: not a model directory or .gguf file")
        return ModelSource(spec, "gguf", path.resolve().parent, gguf_file=path.name)
    if _HUB_ID.match(spec) and not Path(spec.split("/")[0]).exists():
        return ModelSource(spec, "hub", None)  # org/name that is not a local path
    raise BadInputError(f"{spec}: no such file or directory")


@contextlib.contextmanager
def gguf_errors(path: Path) -> Iterator[None]:
    try:
        yield
    except (ValueError, KeyError, OSError, IndexError, EOFError, RuntimeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise BadInputError(f"{path}: cannot read GGUF file ({first[:200]})") from err


#: Seconds the hub probe may take in all (name lookup and connection), and how long its answer holds
#: for one endpoint (:func:`hub_reachable`).
HUB_PROBE_TIMEOUT_S = 3.0
HUB_PROBE_TTL_S = 60.0
_HUB_PROBES: dict[tuple[str, bool], tuple[float, bool]] = {}


def hub_reachable() -> bool:
    """Whether the model hub can be asked at all: False with ``HF_HUB_OFFLINE``, or when a TCP
    connection to its endpoint (``HF_ENDPOINT``) is not made within HUB_PROBE_TIMEOUT_S (name lookup
    included). Where a proxy applies to the endpoint (``urllib.request.getproxies``: the ``*_PROXY``
    variables, and the system settings on macOS / Windows) a direct probe says nothing: True, and the
    hub library decides. The answer holds HUB_PROBE_TTL_S per endpoint.

    Without it a hub id on a machine with no network waited for the hub library's retries (~25 s
    here for a missing model, minutes for a cached one) before failing or reading the cache."""
    import threading
    import time
    import urllib.request
    from urllib.parse import urlparse

    from huggingface_hub import constants

    key = (constants.ENDPOINT, bool(constants.HF_HUB_OFFLINE))
    held = _HUB_PROBES.get(key)
    if held is not None and time.monotonic() - held[0] < HUB_PROBE_TTL_S:
        return held[1]
    url = urlparse(constants.ENDPOINT)
    host, port = url.hostname or "", url.port or (443 if url.scheme == "https" else 80)
    proxies = urllib.request.getproxies()
    if key[1]:
        ok = False
    elif (proxies.get(url.scheme) or proxies.get("all")) and not urllib.request.proxy_bypass(host):
        ok = True
    else:
        result: list[bool] = []

        def probe() -> None:
            try:
                socket.create_connection((host, port), timeout=HUB_PROBE_TIMEOUT_S).close()
                result.append(True)
            except Exception:  # noqa: BLE001 - any failure of the probe means: do not wait for the hub
                result.append(False)

        worker = threading.Thread(target=probe, daemon=True)  # one deadline for the lookup and every address
        worker.start()
        worker.join(HUB_PROBE_TIMEOUT_S)
        ok = bool(result and result[0])
    _HUB_PROBES[key] = (time.monotonic(), ok)
    return ok


def _hub_kwargs(source: ModelSource) -> dict[str, Any]:
    """``local_files_only`` for a hub id when the hub is unreachable: the local cache or a fast error."""
    return {"local_files_only": True} if source.kind == "hub" and not hub_reachable() else {}


def load_config(source: ModelSource) -> Any:
    """The transformers config, checked against the architecture table."""
    from transformers import AutoConfig

    from effllm_tools.pipeline.arch import get_arch

    try:
        if source.kind == "gguf":
            with gguf_errors(source.path / source.gguf_file):
                config = AutoConfig.from_pretrained(str(source.path), gguf_file=source.gguf_file)
        elif source.kind == "hub":
            config = AutoConfig.from_pretrained(source.spec, **_hub_kwargs(source))
        else:
            config = AutoConfig.from_pretrained(str(source.path))
    except BadInputError:
        raise
    except (OSError, ValueError, json.JSONDecodeError) as err:
        where = source.spec
        msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if source.kind == "hub":
            why = "the model hub could not provide it" if hub_reachable() else \
                "the model hub is not reachable, and the local cache holds no copy"
            raise BadInputError(f"{where}: not a local path, {why} ({msg[:160]})") from err
        raise BadInputError(f"{where}: cannot read config ({msg[:200]})") from err
    get_arch(config)  # raises UnsupportedError for non-decoder models
    return config


def load_model(spec: str, *, device: str = "cpu", dtype: str | torch.dtype | None = None,
               sparse24: str | None = None) -> LoadedModel:
    """Load a causal LM and its tokenizer. ``import effllm_tools`` made effllm formats loadable.

    On CUDA, a 2:4-pruned checkpoint gets the 2:4 runtime (``sparse24``: off | on | dual | auto,
    default ``EFFLLM_SPARSE24`` or auto; see :mod:`effllm_tools.runtime.sparse24`).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = resolve_source(spec)
    config = load_config(source)
    torch_dtype = parse_dtype(dtype)
    logging.getLogger("effllm").debug("loading %s (%s, %s, dtype %s) onto %s", source.spec, source.kind,
                                      config.model_type, torch_dtype or "as stored", device)
    if source.kind in ("directory", "demo"):
        check_safetensors_files(source.path)  # a truncated file fails here with its name, not mid-load
    where = str(source.path) if source.path else source.spec
    kwargs: dict[str, Any] = {"dtype": torch_dtype or "auto", **_hub_kwargs(source)}
    if source.gguf_file:
        kwargs["gguf_file"] = source.gguf_file
    else:
        kwargs["use_safetensors"] = True  # never unpickle a pytorch_model.bin
        if source.kind != "hub" and not list(source.path.glob("*.safetensors")):
            raise BadInputError(f"{source.spec}: no *.safetensors weights (pickled .bin weights are not loaded)")
    try:
        ctx = gguf_errors(source.path / source.gguf_file) if source.gguf_file else contextlib.nullcontext()
        with ctx:
            model = AutoModelForCausalLM.from_pretrained(where, **kwargs)
            tokenizer = AutoTokenizer.from_pretrained(
                where, **({"gguf_file": source.gguf_file} if source.gguf_file else {}), **_hub_kwargs(source))
    except (BadInputError, UnsupportedError):
        raise
    except (OSError, ValueError, RuntimeError) as err:
        msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if "safetensors" in msg.lower() or "header" in msg.lower() or "deserializ" in msg.lower():
            raise BadInputError(f"{source.spec}: corrupt or truncated safetensors file ({msg[:160]})") from err
        raise BadInputError(f"{source.spec}: cannot load model ({msg[:200]})") from err
    model.eval()
    logging.getLogger("effllm").debug("loaded %s: %.1fM parameters, %s", source.spec,
                                      sum(p.numel() for p in model.parameters()) / 1e6, next(model.parameters()).dtype)
    if device != "cpu":
        model.to(device)
        from effllm_tools.runtime.sparse24 import maybe_apply_sparse24

        maybe_apply_sparse24(model, source.path if source.kind in ("directory", "demo") else None, device, sparse24)
    return LoadedModel(model, tokenizer, source, info={"model_type": config.model_type})
