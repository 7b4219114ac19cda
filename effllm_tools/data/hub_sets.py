"""The papers' evaluation sets through the ``datasets`` package, when it is installed and reachable.

The texts are joined as the reference code does (research/methods.md §7):

- ``wikitext2``: ``wikitext-2-raw-v1``, test split, ``"\\n\\n".join(text)``;
- ``c4``: ``allenai/c4`` validation shard 0, the first 1100 documents joined with ``" "`` (the
  papers then evaluate the first 256 windows: pass ``max_tokens=256 * seqlen`` to ``eval_windows``);
- ``pg19``: ``deepmind/pg19``, test split, books joined with ``"\\n\\n"``.

Without ``datasets``, or without network access to the Hugging Face hub, loading raises a one-line
``BadInputError`` that names the offline alternatives.
"""

from __future__ import annotations

from typing import Any

from effllm_tools.errors import BadInputError

C4_SHARD = "en/c4-validation.00000-of-00008.json.gz"
C4_DOCUMENTS = 1100
HUB_SETS = {
    "wikitext2": "WikiText-2 (raw v1) test split, via `datasets` (needs the Hugging Face hub)",
    "c4": "C4 validation shard 0, first 1100 documents, via `datasets` (needs the Hugging Face hub)",
    "pg19": "PG-19 test split, via `datasets` (needs the Hugging Face hub)",
}
OFFLINE_HINT = (
    "offline alternatives: austen-prideprejudice (eval), pydocs (out-of-domain eval), calib-mix, austen"
)


def load_hub_set(name: str) -> tuple[str, dict[str, Any]]:
    """The joined text and meta of ``wikitext2``, ``c4`` or ``pg19``."""
    try:
        import datasets
    except ImportError as exc:
        raise BadInputError(
            f"dataset '{name}' needs the `datasets` package (pip install 'effllm[datasets]') "
            f"and the Hugging Face hub; {OFFLINE_HINT}"
        ) from exc
    try:
        return _load(datasets, name)
    except BadInputError:
        raise
    except Exception as exc:  # noqa: BLE001 - datasets raises many types when offline
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise BadInputError(f"dataset '{name}' cannot be reached ({reason}); {OFFLINE_HINT}") from exc


def _load(datasets: Any, name: str) -> tuple[str, dict[str, Any]]:
    version = getattr(datasets, "__version__", "unknown")
    if name == "wikitext2":
        rows = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split="test")
        meta = {"hub_id": "wikitext", "config": "wikitext-2-raw-v1", "split": "test", "join": "\\n\\n"}
        return "\n\n".join(rows["text"]), {"kind": "datasets", "datasets_version": version, **meta}
    if name == "c4":
        rows = datasets.load_dataset("allenai/c4", data_files={"validation": C4_SHARD}, split="validation")
        documents = rows[:C4_DOCUMENTS]["text"]
        meta = {"hub_id": "allenai/c4", "files": [C4_SHARD], "documents": len(documents), "join": " "}
        return " ".join(documents), {"kind": "datasets", "datasets_version": version, **meta}
    if name == "pg19":
        rows = datasets.load_dataset("deepmind/pg19", split="test")
        meta = {"hub_id": "deepmind/pg19", "split": "test", "documents": len(rows), "join": "\\n\\n"}
        return "\n\n".join(rows["text"]), {"kind": "datasets", "datasets_version": version, **meta}
    raise BadInputError(f"unknown hub dataset '{name}' (known: {', '.join(HUB_SETS)})")
