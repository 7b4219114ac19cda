"""The offline named text sets, decoded from Debian packages (research/testbed.md, "The text").

- ``austen-<novel>``: one novel from ``r-cran-janeaustenr`` (an R lazy-load database holding one
  character vector per novel, one element per hard-wrapped line). Lines are joined with ``"\\n"``,
  so an empty element is a blank line between paragraphs and the runs of blank lines around chapter
  headings stay as the book has them.
- ``austen``: the six novels in alphabetical order, separated by a blank line.
- ``pydocs``: the reST sources of the Python 3.11 documentation (``python3.11-doc``), every
  ``*.rst.txt`` under ``html/_sources`` in sorted relative-path order, separated by a blank line.
- ``calib-mix``: the default calibration text, half prose, half technical (testbed.md: calibrating on
  one domain hurts the other): *Emma* + *Mansfield Park* + every k-th pydocs file in sorted order,
  k chosen so the docs part has about as many characters as the two novels.

Decoded texts are cached as plain UTF-8 files with a JSON record of their source files under
``$EFFLLM_CACHE/texts/<package>_<version>/``, so a second load only reads one file.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from effllm_tools.data.debian import cache_root, ensure_debian_package, package_record
from effllm_tools.data.local_text import DOCUMENT_SEPARATOR, read_text_file
from effllm_tools.data.rdata import read_rdata_strings
from effllm_tools.errors import BadInputError

AUSTEN_PACKAGE = "r-cran-janeaustenr"
AUSTEN_DATA = "usr/lib/R/site-library/janeaustenr/data"
NOVELS = {
    "emma": "Emma (1815)",
    "mansfieldpark": "Mansfield Park (1814)",
    "northangerabbey": "Northanger Abbey (1817)",
    "persuasion": "Persuasion (1817)",
    "prideprejudice": "Pride and Prejudice (1813)",
    "sensesensibility": "Sense and Sensibility (1811)",
}
PYDOCS_PACKAGE = "python3.11-doc"
PYDOCS_SOURCES = "usr/share/doc/python3.11/html/_sources"
CALIB_MIX_NOVELS = ("emma", "mansfieldpark")

Loaded = tuple[str, dict[str, Any]]
logger = logging.getLogger(__name__)


def offline_set_names() -> dict[str, str]:
    """Named offline sets -> one-line description (for ``list_named_sets`` and CLI help)."""
    names = {
        "austen": "Jane Austen's six novels (Debian r-cran-janeaustenr), ~1.0M SmolLM2 tokens",
        "pydocs": "Python 3.11 documentation, reST sources (Debian python3.11-doc), ~2.9M tokens",
        "calib-mix": "default calibration set: Emma + Mansfield Park + an equal share of pydocs",
    }
    for novel, title in NOVELS.items():
        names[f"austen-{novel}"] = f"{title} by Jane Austen (Debian r-cran-janeaustenr)"
    return names


def load_offline_set(name: str) -> Loaded:
    """The text and meta of one offline set (see ``offline_set_names``)."""
    if name == "austen":
        return _join_parts([_novel(novel, name) for novel in NOVELS], name)
    if name.startswith("austen-") and name[len("austen-") :] in NOVELS:
        return _novel(name[len("austen-") :], name)
    if name == "pydocs":
        return _pydocs(name)
    if name == "calib-mix":
        novels = [_novel(novel, name) for novel in CALIB_MIX_NOVELS]
        novel_chars = sum(len(text) for text, _ in novels)
        return _join_parts([*novels, _pydocs(name, match_chars=novel_chars)], name)
    raise BadInputError(f"unknown offline text set '{name}' (known: {', '.join(offline_set_names())})")


def _novel(novel: str, set_name: str) -> Loaded:
    root = ensure_debian_package(AUSTEN_PACKAGE, needed_for=f"offline text set '{set_name}'")

    def decode() -> Loaded:
        data = root / AUSTEN_DATA
        vectors = read_rdata_strings(data / "Rdata.rdb", data / "Rdata.rdx")
        if novel not in vectors:
            raise BadInputError(f"{data / 'Rdata.rdb'}: no character vector '{novel}'")
        files = [f"{AUSTEN_DATA}/Rdata.rdb#{novel}"]
        return "\n".join(vectors[novel]).strip("\n"), {"files": files, "lines": len(vectors[novel])}

    return _cached(root, f"austen-{novel}", decode)


def _pydocs(set_name: str, match_chars: int | None = None) -> Loaded:
    """All pydocs files, or (``match_chars``) every k-th file for about that many characters."""
    root = ensure_debian_package(PYDOCS_PACKAGE, needed_for=f"offline text set '{set_name}'")
    full_text, full_meta = _cached(root, "pydocs", lambda: _decode_pydocs(root, stride=1))
    if match_chars is None:
        return full_text, full_meta
    stride = max(1, round(len(full_text) / match_chars))
    return _cached(root, f"pydocs-every-{stride}", lambda: _decode_pydocs(root, stride=stride))


def _decode_pydocs(root: Path, stride: int) -> Loaded:
    sources = root / PYDOCS_SOURCES
    files = sorted(p.relative_to(sources).as_posix() for p in sources.rglob("*.rst.txt") if p.is_file())
    if not files:
        raise BadInputError(f"{sources}: no *.rst.txt files in the {PYDOCS_PACKAGE} package")
    chosen = files[::stride]
    texts = [read_text_file(sources / relative).strip("\n") for relative in chosen]
    meta = {"files": [f"{PYDOCS_SOURCES}/{relative}" for relative in chosen], "stride": stride}
    return DOCUMENT_SEPARATOR.join(text for text in texts if text), meta


def _join_parts(parts: list[Loaded], name: str) -> Loaded:
    """Several decoded texts as one, separated by a blank line; meta lists each part's size."""
    meta: dict[str, Any] = {"kind": "offline", "set": name, "files": [], "packages": {}, "parts": []}
    for text, part in parts:
        meta["files"] += part["files"]
        meta["packages"].update(part["packages"])
        meta["parts"].append({"name": part["set"], "chars": len(text)})
    return DOCUMENT_SEPARATOR.join(text for text, _ in parts), meta


def _cached(root: Path, key: str, decode: Callable[[], Loaded]) -> Loaded:
    """The decoded text ``key`` of the package at ``root``, from the text cache or decoded once."""
    record = package_record(root)
    folder = cache_root() / "texts" / f"{record['name']}_{record['version']}"
    text_path, meta_path = folder / f"{key}.txt", folder / f"{key}.json"
    if text_path.is_file() and meta_path.is_file():
        text = text_path.read_bytes().decode("utf-8")  # bytes: keep any "\r" exactly as decoded
        return text, json.loads(meta_path.read_bytes().decode("utf-8"))
    text, meta = decode()
    meta = {"kind": "offline", "set": key, **meta}
    meta["packages"] = {record["name"]: record["version"]}
    try:
        _write_atomic(meta_path, json.dumps(meta, indent=1))
        _write_atomic(text_path, text)  # written last: its presence marks a complete entry
    except OSError as exc:  # a read-only cache only costs speed: decode again next time
        logger.warning("could not cache the decoded text %s (%s)", text_path, exc)
    return text, meta


def _write_atomic(path: Path, content: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8", newline="") as out:
            out.write(content)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
