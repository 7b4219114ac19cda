"""Read character vectors from an R lazy-load database (``Rdata.rdb`` + ``Rdata.rdx``) without R.

An R package's ``data/`` folder stores its data sets as a lazy-load database (R Internals §1.8):

- ``Rdata.rdx`` is a gzip file holding one serialized R list
  ``list(variables = list(<name> = c(offset, length), ...), references = ..., compressed = ...)``;
- ``Rdata.rdb`` holds, at each ``offset``, ``length`` bytes: a 4-byte big-endian uncompressed size,
  (for ``compressed = 2 or 3`` a one-byte codec tag) and the compressed serialization of the value.

Values are in R's XDR serialization format (R Internals §1.8, ``serialize.c``): ``X\\n``, the format
version (2 or 3), two R versions, for version 3 the native encoding, then one item. Each item starts
with an int of flags: ``type = flags & 0xFF``, has-attributes ``flags & 512``, has-tag ``flags & 1024``,
and for strings the encoding bits in ``flags >> 12``. Only the item types that data sets of plain
vectors and lists use are decoded; anything else raises ``UnsupportedError`` naming the type.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import struct
import zlib
from pathlib import Path
from typing import Any

from effllm_tools.errors import BadInputError, UnsupportedError

# SEXP types (Rinternals.h) and serialization pseudo-types (serialize.c).
SYMSXP, LISTSXP, CLOSXP, PROMSXP, LANGSXP, CHARSXP = 1, 2, 3, 5, 6, 9
LGLSXP, INTSXP, REALSXP, STRSXP, VECSXP, EXPRSXP = 10, 13, 14, 16, 19, 20
NILVALUE, REFSXP, EMPTYENV, BASEENV, GLOBALENV = 254, 255, 242, 241, 253
ATTRLISTSXP, ATTRLANGSXP = 239, 240
_PAIRLIST_TYPES = {LISTSXP, LANGSXP, CLOSXP, PROMSXP, ATTRLISTSXP, ATTRLANGSXP}
_ENV_TYPES = {EMPTYENV, BASEENV, GLOBALENV}
_HAS_ATTR, _HAS_TAG = 1 << 9, 1 << 10
_LATIN1, _UTF8 = 1 << 2, 1 << 3  # CHARSXP encoding bits of the "levels" (flags >> 12)
NA_INTEGER = -(2**31)


class RVector(list):
    """An R atomic vector or list decoded to a Python list, with its R attributes kept aside."""

    rtype: int
    attributes: dict[str, Any]

    def __init__(self, rtype: int, items: list[Any], attributes: dict[str, Any] | None = None) -> None:
        super().__init__(items)
        self.rtype = rtype  # the SEXP type, e.g. STRSXP for a character vector
        self.attributes = attributes or {}


class _XdrReader:
    """A cursor over one XDR-serialized R object (``serialize(x, NULL, xdr = TRUE)``)."""

    def __init__(self, data: bytes, source: str) -> None:
        self.data, self.pos, self.source = data, 0, source
        self.refs: list[Any] = []

    def fail(self, what: str) -> BadInputError:
        return BadInputError(f"{self.source}: not a readable R serialization: {what} at byte {self.pos}")

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise self.fail(f"truncated (wanted {n} bytes)")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def int(self) -> int:
        return struct.unpack(">i", self.take(4))[0]

    def length(self) -> int:
        n = self.int()
        if n == -1:  # long vector: upper and lower 32 bits follow
            upper, lower = struct.unpack(">II", self.take(8))
            n = (upper << 32) | lower
        return n

    def header(self) -> None:
        if self.take(2) != b"X\n":
            raise self.fail("no XDR header 'X\\n' (only the binary XDR format is supported)")
        version = self.int()
        self.take(8)  # writer's R version, minimal reader version
        if version == 3:
            self.take(self.int())  # native encoding name, e.g. "UTF-8"
        elif version != 2:
            raise self.fail(f"serialization version {version}")

    def item(self) -> Any:
        return self.item_from(self.int())

    def item_from(self, flags: int) -> Any:
        """The item whose flags int has just been read."""
        kind = flags & 0xFF
        if kind == NILVALUE or kind in _ENV_TYPES:
            return None
        if kind == REFSXP:
            index = (flags >> 8) or self.int()  # index 0 means "the index follows"
            if not 0 < index <= len(self.refs):
                raise self.fail(f"reference {index} to an unknown symbol")
            return self.refs[index - 1]
        if kind == SYMSXP:
            name = self.item()
            self.refs.append(name)
            return name
        if kind == CHARSXP:
            return self.charsxp(flags)
        if kind in _PAIRLIST_TYPES:
            return self.pairlist(flags)
        return self.vector(kind, flags)

    def charsxp(self, flags: int) -> str | None:
        n = self.int()
        if n == -1:
            return None  # NA_character_
        raw = self.take(n)
        encoding = "latin-1" if (flags >> 12) & _LATIN1 else "utf-8"
        return raw.decode(encoding, errors="replace")

    def pairlist(self, flags: int) -> dict[str, Any]:
        """A pairlist (attributes, argument lists) as {tag: value}, following CDRs iteratively."""
        out: dict[str, Any] = {}
        while True:
            kind = flags & 0xFF
            if kind == NILVALUE:
                return out
            if kind not in _PAIRLIST_TYPES:  # a dotted pair's last CDR: keep it under a blank tag
                out[""] = self.item_from(flags)
                return out
            if flags & _HAS_ATTR:
                self.item()
            tag = self.item() if flags & _HAS_TAG else None
            out[str(tag) if tag is not None else str(len(out))] = self.item()
            flags = self.int()

    def vector(self, kind: int, flags: int) -> RVector:
        n = self.length()
        if kind in (LGLSXP, INTSXP):
            items: list[Any] = [
                None if v == NA_INTEGER else v for v in struct.unpack(f">{n}i", self.take(4 * n))
            ]
        elif kind == REALSXP:
            items = list(struct.unpack(f">{n}d", self.take(8 * n)))
        elif kind in (STRSXP, VECSXP, EXPRSXP):
            items = [self.item() for _ in range(n)]
        else:
            raise UnsupportedError(
                f"{self.source}: R object type {kind} is not supported by effllm's R reader"
            )
        attributes = self.item() if flags & _HAS_ATTR else None
        return RVector(kind, items, attributes)


def unserialize(data: bytes, source: str = "<bytes>") -> Any:
    """Decode one XDR-serialized R object: vectors become ``RVector``, pairlists dicts, NULL ``None``."""
    reader = _XdrReader(data, source)
    reader.header()
    return reader.item()


def named_list(value: Any, source: str) -> dict[str, Any]:
    """An R list with a ``names`` attribute as a Python dict (name -> element)."""
    names = getattr(value, "attributes", {}).get("names")
    if not isinstance(value, RVector) or names is None or len(names) != len(value):
        raise BadInputError(f"{source}: expected a named R list")
    return dict(zip(names, value, strict=True))


def _decompress(blob: bytes, compressed: Any, source: str) -> bytes:
    """One lazy-load record: 4-byte size, [codec byte when compressed is 2 or 3], compressed bytes."""
    codec = compressed[0] if isinstance(compressed, list) and compressed else compressed
    body = blob[4:]
    if codec in (2, 3):
        tag, body = body[:1], body[1:]
        codec = {b"Z": 1, b"2": 2, b"X": 3, b"0": 0}.get(tag, -1)
    try:
        if codec in (1, True):
            return zlib.decompress(body)
        if codec == 2:
            return bz2.decompress(body)
        if codec == 3:
            return lzma.decompress(body)
        if codec in (0, False):
            return body
    except (zlib.error, OSError, lzma.LZMAError) as exc:
        raise BadInputError(f"{source}: corrupt compressed record: {exc}") from exc
    raise UnsupportedError(f"{source}: unknown lazy-load compression {compressed!r}")


def read_lazyload_index(rdx: Path) -> tuple[dict[str, tuple[int, int]], Any]:
    """The ``variables`` index of ``rdx``: name -> (offset, length) in the ``.rdb``, and ``compressed``."""
    try:
        raw = gzip.decompress(Path(rdx).read_bytes())
    except (OSError, EOFError) as exc:
        raise BadInputError(f"{rdx}: cannot read the R lazy-load index: {exc}") from exc
    index = named_list(unserialize(raw, str(rdx)), str(rdx))
    variables = named_list(index.get("variables"), f"{rdx} (variables)")
    spans = {name: (int(span[0]), int(span[1])) for name, span in variables.items()}
    return spans, index.get("compressed", True)


def read_rdata_strings(rdb: Path, rdx: Path) -> dict[str, list[str]]:
    """Every character vector of an R lazy-load database, as variable name -> list of strings.

    R's ``NA_character_`` elements become empty strings; variables that are not character
    vectors (numbers, data frames) are skipped.
    """
    spans, compressed = read_lazyload_index(rdx)
    try:
        data = Path(rdb).read_bytes()
    except OSError as exc:
        raise BadInputError(f"{rdb}: cannot read the R lazy-load database: {exc}") from exc
    out: dict[str, list[str]] = {}
    for name, (offset, length) in spans.items():
        if offset + length > len(data):
            raise BadInputError(f"{rdb}: variable '{name}' lies past the end of the file")
        raw = _decompress(data[offset : offset + length], compressed, f"{rdb} ({name})")
        value = unserialize(raw, f"{rdb} ({name})")
        if isinstance(value, RVector) and value.rtype == STRSXP:
            out[name] = ["" if v is None else v for v in value]
    return out
