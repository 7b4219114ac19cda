"""The R lazy-load reader on handcrafted XDR blobs, and (slow) on the real janeaustenr package."""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path
from typing import Any

import pytest

from effllm_tools.data.rdata import STRSXP, read_lazyload_index, read_rdata_strings, unserialize
from effllm_tools.errors import BadInputError, UnsupportedError


def test_reads_character_vectors_by_name(tmp_path: Path, xdr: Any) -> None:
    novel = ["PRIDE AND PREJUDICE", "", "It is a truth universally acknowledged,", "café — naïve"]
    rdb, rdx = xdr.write_rdata(tmp_path, {"novel": xdr.strsxp(novel), "other": xdr.strsxp(["x", "y"])})
    assert read_rdata_strings(rdb, rdx) == {"novel": novel, "other": ["x", "y"]}


def test_index_holds_offsets_lengths_and_shared_symbols(tmp_path: Path, xdr: Any) -> None:
    # The index is a named list of named lists: the second "names" symbol is a REFSXP back-reference.
    rdb, rdx = xdr.write_rdata(tmp_path, {"a": xdr.strsxp(["1"]), "b": xdr.strsxp(["2", "3"])})
    spans, compressed = read_lazyload_index(rdx)
    sizes = [length for _, length in spans.values()]
    assert list(spans) == ["a", "b"] and spans["a"][0] == 0 and spans["b"][0] == sizes[0]
    assert sum(sizes) == rdb.stat().st_size
    assert compressed == [True]


def test_na_becomes_empty_string_and_latin1_is_decoded(tmp_path: Path, xdr: Any) -> None:
    latin1 = xdr.charsxp("Gr\xfc\xdfe", xdr.LATIN1)
    body = xdr.be_int(STRSXP) + xdr.be_int(3) + xdr.charsxp("a") + xdr.charsxp(None) + latin1
    rdb, rdx = xdr.write_rdata(tmp_path, {"v": body})
    assert read_rdata_strings(rdb, rdx) == {"v": ["a", "", "Grüße"]}


def test_non_character_variables_are_skipped(tmp_path: Path, xdr: Any) -> None:
    listed = xdr.fresh()
    variables = {
        "numbers": xdr.intsxp([1, 2, 3]),
        "nested": listed.named_list({"inner": listed.strsxp(["x"])}),
        "words": xdr.strsxp(["kept"]),
    }
    rdb, rdx = xdr.write_rdata(tmp_path, variables)
    assert read_rdata_strings(rdb, rdx) == {"words": ["kept"]}


def test_xz_records_are_read(tmp_path: Path, xdr: Any) -> None:
    rdb, rdx = xdr.write_rdata(tmp_path, {"v": xdr.strsxp(["packed with xz"] * 50)}, compressed=3)
    assert read_rdata_strings(rdb, rdx) == {"v": ["packed with xz"] * 50}


def test_unserialize_keeps_type_and_attributes(xdr: Any) -> None:
    value = unserialize(xdr.serialize(xdr.named_list({"a": xdr.intsxp([7]), "b": xdr.strsxp(["s"])})))
    assert value.attributes["names"] == ["a", "b"]
    assert value[0] == [7] and value[1] == ["s"] and value[1].rtype == STRSXP


def test_truncated_blob_is_a_one_line_bad_input_error(xdr: Any) -> None:
    blob = xdr.serialize(xdr.strsxp(["a long enough string"]))
    with pytest.raises(BadInputError, match=r"^demo\.rdb: not a readable R serialization: truncated"):
        unserialize(blob[:-5], "demo.rdb")


def test_ascii_serialization_is_rejected() -> None:
    with pytest.raises(BadInputError, match="no XDR header"):
        unserialize(b"A\n3\n", "x.rds")


def test_unknown_type_is_unsupported(xdr: Any) -> None:
    closure_env = xdr.be_int(4) + xdr.be_int(0)  # ENVSXP: not something data sets of vectors use
    with pytest.raises(UnsupportedError, match="R object type 4"):
        unserialize(xdr.serialize(closure_env), "env.rdb")


def test_corrupt_record_and_span_past_end(tmp_path: Path, xdr: Any) -> None:
    rdb, rdx = xdr.write_rdata(tmp_path, {"v": xdr.strsxp(["text"])})
    size = rdb.stat().st_size
    rdb.write_bytes((struct.pack(">I", 10) + b"not zlib at all").ljust(size, b"!"))
    with pytest.raises(BadInputError, match=r"Rdata\.rdb \(v\): corrupt compressed record"):
        read_rdata_strings(rdb, rdx)
    rdb.write_bytes(b"")
    with pytest.raises(BadInputError, match="'v' lies past the end"):
        read_rdata_strings(rdb, rdx)


def test_index_that_is_not_gzip_is_bad_input(tmp_path: Path, xdr: Any) -> None:
    rdx = tmp_path / "Rdata.rdx"
    rdx.write_bytes(zlib.compress(b"X\n"))
    with pytest.raises(BadInputError, match=r"Rdata\.rdx: cannot read the R lazy-load index"):
        read_lazyload_index(rdx)
    rdx.write_bytes(gzip.compress(xdr.serialize(xdr.strsxp(["no names"]))))
    with pytest.raises(BadInputError, match="expected a named R list"):
        read_lazyload_index(rdx)


@pytest.mark.slow
def test_real_janeaustenr_package() -> None:
    from effllm_tools.data.debian import ensure_debian_package
    from effllm_tools.data.offline_sets import AUSTEN_DATA

    data = ensure_debian_package("r-cran-janeaustenr") / AUSTEN_DATA
    novels = read_rdata_strings(data / "Rdata.rdb", data / "Rdata.rdx")
    assert sorted(novels) == [
        "emma",
        "mansfieldpark",
        "northangerabbey",
        "persuasion",
        "prideprejudice",
        "sensesensibility",
    ]
    pride = novels["prideprejudice"]
    assert 12_500 < len(pride) < 13_500 and pride[0] == "PRIDE AND PREJUDICE"
    assert "It is a truth universally acknowledged, that a single man in possession" in pride[:20]
    assert all(isinstance(line, str) for novel in novels.values() for line in novel)
