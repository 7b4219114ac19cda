"""One entry point for every text effllm calibrates or evaluates on: ``load_text(spec)``.

``spec`` is a named set (``list_named_sets()``: the offline Austen and Python-docs sets, and
wikitext2 / c4 / pg19 through ``datasets``) or a path: a UTF-8 text file, a ``.jsonl`` file (one
JSON object per line; ``field`` is read from each) or a folder (its *.txt, *.md, *.rst files, sorted,
recursively). A name wins over a same-named file in the working directory unless the spec looks like
a path (contains a slash or starts with "."): write ``./austen`` for a local folder called austen.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path
from typing import Any

from effllm_tools.data.hub_sets import HUB_SETS, load_hub_set
from effllm_tools.data.local_text import load_file, load_folder, load_jsonl
from effllm_tools.data.offline_sets import load_offline_set, offline_set_names
from effllm_tools.errors import BadInputError


@dataclasses.dataclass(frozen=True)
class TextSource:
    """A loaded text and where it came from.

    ``meta`` always holds ``kind`` (file, folder, jsonl, offline, datasets), ``sha256`` (of the
    UTF-8 text) and ``chars``; files and folders add ``files``; offline sets add ``files`` (paths
    inside the Debian packages) and ``packages`` (name -> Debian version).
    """

    name: str
    text: str
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)


def list_named_sets() -> dict[str, str]:
    """Every named set ``load_text`` accepts -> a one-line description (offline sets first)."""
    return {**offline_set_names(), **HUB_SETS}


def load_text(spec: str, *, field: str = "text") -> TextSource:
    """The text named by ``spec`` (a named set, a text file, a ``.jsonl`` file or a folder).

    ``field`` is the JSON key read from each line of a ``.jsonl`` file. Raises ``BadInputError``
    with one line naming the file or set and what is wrong.
    """
    spec = str(spec)
    check_text_spec(spec)
    if names_a_set(spec):
        loader = load_hub_set if spec in HUB_SETS else load_offline_set
        text, meta = loader(spec)
    else:
        text, meta = _load_path(Path(spec).expanduser(), field)
    meta = {**meta, "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(), "chars": len(text)}
    return TextSource(name=spec, text=text, meta=meta)


def check_text_spec(spec: str) -> None:
    """What ``load_text`` refuses before reading anything (also ``--dry-run``'s check): an empty spec,
    or a path that does not exist and is not a named set. Reads no text, fetches nothing."""
    spec = str(spec)
    if not spec.strip():
        raise BadInputError("dataset: empty name; pass a named set or a file/folder path")
    if names_a_set(spec):
        return
    path = Path(spec).expanduser()
    if not path.exists():
        raise BadInputError(f"{path}: no such file or folder, and not a named set (named sets: {', '.join(list_named_sets())})")


def names_a_set(spec: str) -> bool:
    """Whether ``load_text`` reads ``spec`` as a named set: a set's name wins over a same-named local
    path unless the spec looks like a path ("./calib-mix")."""
    return spec in list_named_sets() and not _looks_like_path(spec)


def _looks_like_path(spec: str) -> bool:
    return spec.startswith(".") or "/" in spec or os.sep in spec


def _load_path(path: Path, field: str) -> tuple[str, dict[str, Any]]:
    """A path that exists (:func:`check_text_spec`): a folder, a ``.jsonl`` file or a text file."""
    if path.is_dir():
        return load_folder(path)
    if path.name.lower().endswith(".jsonl"):
        return load_jsonl(path, field)
    return load_file(path)
