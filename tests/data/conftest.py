"""Fixtures for the data tests: a writer of tiny, handcrafted R lazy-load databases, an isolated
cache, and a fake unpacked Debian package tree so the offline sets load with no network."""

from __future__ import annotations

import gzip
import json
import lzma
import struct
import zlib
from pathlib import Path

import pytest

# R serialization (serialize.c), XDR flavour: big-endian ints, flags = type | attr 512 | tag 1024.
CHARSXP, STRSXP, INTSXP, VECSXP, LISTSXP, SYMSXP, LGLSXP = 9, 16, 13, 19, 2, 1, 10
NILVALUE, REFSXP = 254, 255
HAS_ATTR, HAS_TAG = 512, 1024
UTF8, LATIN1 = 1 << 3, 1 << 2  # CHARSXP encoding "levels", stored in flags >> 12


def be_int(value: int) -> bytes:
    return struct.pack(">i", value)


class XdrWriter:
    """Serializes a few R object kinds the way R does, symbols shared through REFSXP.

    Tests get it through the ``xdr`` fixture (conftest modules cannot be imported under pytest's
    importlib mode), hence the constants and helpers as attributes.
    """

    UTF8, LATIN1 = UTF8, LATIN1
    be_int = staticmethod(be_int)

    def __init__(self) -> None:
        self.symbols: list[str] = []

    def fresh(self) -> XdrWriter:
        """A writer with an empty symbol table, as each separately serialized object needs."""
        return XdrWriter()

    def write_rdata(
        self, folder: Path, variables: dict[str, bytes], compressed: int = 1
    ) -> tuple[Path, Path]:
        return write_rdata(folder, variables, compressed)

    def header(self) -> bytes:
        encoding = b"UTF-8"
        return b"X\n" + be_int(3) + be_int(0x040201) + be_int(0x030500) + be_int(len(encoding)) + encoding

    def charsxp(self, value: str | None, levels: int = UTF8) -> bytes:
        if value is None:
            return be_int(CHARSXP) + be_int(-1)
        raw = value.encode("latin-1" if levels & LATIN1 else "utf-8")
        return be_int(CHARSXP | (levels << 12)) + be_int(len(raw)) + raw

    def symbol(self, name: str) -> bytes:
        if name in self.symbols:  # R writes a repeated symbol as a reference (1-based index)
            return be_int(REFSXP | ((self.symbols.index(name) + 1) << 8))
        self.symbols.append(name)
        return be_int(SYMSXP) + self.charsxp(name)

    def strsxp(self, values: list[str | None], levels: int = UTF8) -> bytes:
        return be_int(STRSXP) + be_int(len(values)) + b"".join(self.charsxp(v, levels) for v in values)

    def intsxp(self, values: list[int]) -> bytes:
        return be_int(INTSXP) + be_int(len(values)) + b"".join(be_int(v) for v in values)

    def named_list(self, items: dict[str, bytes]) -> bytes:
        """A VECSXP of already-serialized items with a ``names`` attribute pairlist."""
        body = be_int(VECSXP | HAS_ATTR) + be_int(len(items)) + b"".join(items.values())
        names = self.strsxp(list(items))
        return body + be_int(LISTSXP | HAS_TAG) + self.symbol("names") + names + be_int(NILVALUE)

    def serialize(self, body: bytes) -> bytes:
        return self.header() + body


def write_rdata(folder: Path, variables: dict[str, bytes], compressed: int = 1) -> tuple[Path, Path]:
    """An ``Rdata.rdb`` / ``Rdata.rdx`` pair holding pre-serialized ``variables`` (name -> body)."""
    folder.mkdir(parents=True, exist_ok=True)
    records, spans, offset = [], {}, 0
    for name, body in variables.items():
        raw = XdrWriter().serialize(body)
        if compressed == 3:
            record = struct.pack(">I", len(raw)) + b"X" + lzma.compress(raw)
        else:
            record = struct.pack(">I", len(raw)) + zlib.compress(raw)
        records.append(record)
        spans[name] = (offset, len(record))
        offset += len(record)
    index = XdrWriter()
    variables_list = index.named_list({n: index.intsxp(list(span)) for n, span in spans.items()})
    compressed_item = (
        be_int(LGLSXP) + be_int(1) + be_int(1) if compressed == 1 else index.intsxp([compressed])
    )
    body = index.named_list({"variables": variables_list, "compressed": compressed_item})
    (folder / "Rdata.rdb").write_bytes(b"".join(records))
    (folder / "Rdata.rdx").write_bytes(gzip.compress(index.serialize(body)))
    return folder / "Rdata.rdb", folder / "Rdata.rdx"


@pytest.fixture
def xdr() -> XdrWriter:
    return XdrWriter()


@pytest.fixture
def isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("EFFLLM_CACHE", str(cache))
    monkeypatch.delenv("EFFLLM_DEB_DIR", raising=False)
    return cache


NOVEL_NAMES = ["emma", "mansfieldpark", "northangerabbey", "persuasion", "prideprejudice", "sensesensibility"]


def _fake_package(cache: Path, name: str, version: str) -> Path:
    root = cache / "debian" / name
    root.mkdir(parents=True)
    record = {"name": name, "version": version, "deb": f"{name}_{version}_all.deb", "deb_sha256": "0" * 64}
    (root / ".effllm-package.json").write_text(json.dumps(record))
    return root


@pytest.fixture
def fake_packages(isolated_cache: Path) -> Path:
    """Already 'unpacked' r-cran-janeaustenr and python3.11-doc trees in the isolated cache."""
    austen = _fake_package(isolated_cache, "r-cran-janeaustenr", "1.0.0-1")
    writer = XdrWriter()
    novels = {
        name: writer.strsxp([name.upper(), "", "", f"First line of {name}.", "second line.", "", "The end."])
        for name in NOVEL_NAMES
    }
    write_rdata(austen / "usr/lib/R/site-library/janeaustenr/data", novels)
    docs = _fake_package(isolated_cache, "python3.11-doc", "3.11.2-6")
    sources = docs / "usr/share/doc/python3.11/html/_sources"
    for index, relative in enumerate(["b.rst.txt", "a/z.rst.txt", "a/y.rst.txt", "c/x.rst.txt"]):
        (sources / relative).parent.mkdir(parents=True, exist_ok=True)
        (sources / relative).write_text(f"Doc {relative}\n{'=' * 8}\n\n" + "word " * (40 * (index + 1)))
    return isolated_cache
