"""Text from the user's own files: a UTF-8 text file, a folder of text files, or a JSONL file.

Each reader returns ``(text, meta)``; ``sources.load_text`` wraps it in a ``TextSource``.
Every failure is a ``BadInputError`` whose one line names the file (and line) and what is wrong.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from effllm_tools.errors import BadInputError

FOLDER_SUFFIXES = (".txt", ".md", ".rst")  # ".rst.txt" ends in ".txt"
DOCUMENT_SEPARATOR = "\n\n"


def read_text_file(path: Path) -> str:
    """A file's text, decoded as UTF-8 (a leading byte-order mark is dropped).

    Raises ``BadInputError`` for a missing or unreadable file, binary content (a NUL byte) or
    bytes that are not UTF-8. Empty text is returned as is: callers decide whether that is an error.
    """
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError as exc:
        raise BadInputError(f"{path}: no such file") from exc
    except OSError as exc:
        raise BadInputError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    if b"\x00" in raw:
        raise BadInputError(f"{path}: looks binary (contains NUL bytes), expected UTF-8 text")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise BadInputError(f"{path}: not UTF-8 text (invalid byte at offset {exc.start})") from exc


def load_file(path: Path) -> tuple[str, dict[str, Any]]:
    """One UTF-8 text file; an empty or whitespace-only file is an error."""
    text = read_text_file(path)
    if not text.strip():
        raise BadInputError(f"{path}: the file is empty")
    return text, {"kind": "file", "files": [str(path)]}


def folder_files(folder: Path) -> list[Path]:
    """The folder's text files (*.txt, *.md, *.rst, *.rst.txt) at any depth, sorted by relative path.

    Hidden files and anything under a hidden folder (``.git``, ``.cache``) are skipped.
    """
    found = []
    for path in Path(folder).rglob("*"):
        relative = path.relative_to(folder)
        if any(part.startswith(".") for part in relative.parts):
            continue
        if path.is_file() and path.name.lower().endswith(FOLDER_SUFFIXES):
            found.append(path)
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


def load_folder(folder: Path) -> tuple[str, dict[str, Any]]:
    """All text files of a folder in sorted relative-path order, joined with a blank line.

    Empty files are skipped; a folder with no non-empty text file is an error.
    """
    texts, used = [], []
    for path in folder_files(folder):
        text = read_text_file(path)
        if text.strip():
            texts.append(text.strip("\n"))
            used.append(path.relative_to(folder).as_posix())
    if not texts:
        suffixes = ", ".join(f"*{s}" for s in FOLDER_SUFFIXES)
        raise BadInputError(f"{folder}: the folder holds no non-empty text file ({suffixes})")
    return DOCUMENT_SEPARATOR.join(texts), {"kind": "folder", "root": str(folder), "files": used}


def load_jsonl(path: Path, field: str = "text") -> tuple[str, dict[str, Any]]:
    """The string ``field`` of every JSON object in a JSONL file, joined with a blank line.

    Blank lines are skipped. Invalid JSON, a line that is not an object, a missing field or a
    field that is not a string is an error naming the line number (1-based).
    """
    documents = []
    for number, line in enumerate(read_text_file(path).splitlines(), start=1):
        if line.strip():
            documents.append(_jsonl_field(path, number, line, field))
    if not any(doc.strip() for doc in documents):
        raise BadInputError(f"{path}: no non-empty '{field}' values (the file holds no documents)")
    meta = {"kind": "jsonl", "files": [str(path)], "field": field, "documents": len(documents)}
    return DOCUMENT_SEPARATOR.join(documents), meta


def _jsonl_field(path: Path, number: int, line: str, field: str) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise BadInputError(f"{path} line {number}: invalid JSON ({exc.msg} at column {exc.colno})") from exc
    if not isinstance(record, dict):
        raise BadInputError(f"{path} line {number}: expected a JSON object, got {type(record).__name__}")
    if field not in record:
        keys = ", ".join(sorted(map(str, record))) or "none"
        raise BadInputError(f"{path} line {number}: no field '{field}' (fields: {keys})")
    value = record[field]
    if not isinstance(value, str):
        raise BadInputError(f"{path} line {number}: field '{field}' is {type(value).__name__}, not a string")
    return value
