"""load_text: files, folders, JSONL (with line-numbered errors), offline sets from a fake package
tree in an isolated cache, and the hub sets' offline error."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest

from effllm_tools.data.sources import TextSource, list_named_sets, load_text
from effllm_tools.errors import BadInputError, ExitCode

NOVELS = ["emma", "mansfieldpark", "northangerabbey", "persuasion", "prideprejudice", "sensesensibility"]


def test_text_file_is_read_as_utf8_and_hashed(tmp_path: Path) -> None:
    path = tmp_path / "t.txt"
    path.write_bytes("\ufeffNaïve café.\r\nSecond line.\n".encode())
    source = load_text(str(path))
    assert isinstance(source, TextSource) and source.name == str(path)
    assert source.text == "Naïve café.\r\nSecond line.\n"  # BOM dropped, newlines untouched
    assert source.meta["sha256"] == hashlib.sha256(source.text.encode()).hexdigest()
    assert source.meta["kind"] == "file" and source.meta["files"] == [str(path)]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "the file is empty"),
        (b" \n\n", "the file is empty"),
        (b"ab\x00cd", "looks binary"),
        (b"caf\xe9", "not UTF-8"),
    ],
)
def test_bad_text_files_name_the_file(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "bad.txt"
    path.write_bytes(content)
    with pytest.raises(BadInputError, match=message) as info:
        load_text(str(path))
    assert str(info.value).startswith(str(path)) and "\n" not in str(info.value)
    assert info.value.exit_code == ExitCode.BAD_INPUT


def test_missing_path_lists_the_named_sets(tmp_path: Path) -> None:
    with pytest.raises(BadInputError, match=r"no such file or folder, and not a named set .*austen, "):
        load_text(str(tmp_path / "nope.txt"))


def test_folder_reads_text_files_recursively_in_sorted_order(tmp_path: Path) -> None:
    files = {
        "b.txt": "B",
        "a/z.rst.txt": "AZ",
        "a/y.md": "AY\n\n",
        "c.rst": "\nC",
        "d.json": "{}",
        "e.py": "x",
    }
    files |= {".hidden/h.txt": "hidden", "empty.txt": "", "a/.h.txt": "hidden too"}
    for relative, text in files.items():
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relative).write_text(text)
    source = load_text(str(tmp_path))
    assert source.text == "AY\n\nAZ\n\nB\n\nC"
    assert source.meta["files"] == ["a/y.md", "a/z.rst.txt", "b.txt", "c.rst"]


def test_folder_without_text_files_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "x.bin").write_bytes(b"\x00")
    with pytest.raises(BadInputError, match="holds no non-empty text file"):
        load_text(str(tmp_path))


def test_folder_with_a_binary_text_file_names_it(tmp_path: Path) -> None:
    (tmp_path / "ok.txt").write_text("fine")
    (tmp_path / "broken.txt").write_bytes(b"\x00\x01")
    with pytest.raises(BadInputError, match=r"broken\.txt: looks binary"):
        load_text(str(tmp_path))


def test_jsonl_takes_the_field_of_each_line(tmp_path: Path) -> None:
    path = tmp_path / "docs.jsonl"
    lines = [json.dumps({"text": "first doc", "id": 1}), "", json.dumps({"text": "second\ndoc", "body": "b"})]
    path.write_text("\n".join(lines) + "\n")
    source = load_text(str(path))
    assert source.text == "first doc\n\nsecond\ndoc"
    assert source.meta["documents"] == 2 and source.meta["kind"] == "jsonl"
    with pytest.raises(BadInputError, match=r"docs\.jsonl line 1: no field 'body' \(fields: id, text\)"):
        load_text(str(path), field="body")


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        ('{"text": "unterminated', r"line 3: invalid JSON \(Unterminated string"),
        ('{"content": "x"}', r"line 3: no field 'text' \(fields: content\)"),
        ('{"text": 5}', r"line 3: field 'text' is int, not a string"),
        ('["text"]', r"line 3: expected a JSON object, got list"),
    ],
)
def test_jsonl_errors_name_the_line(tmp_path: Path, bad_line: str, message: str) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a"}\n{"text": "b"}\n' + bad_line + '\n{"text": "c"}\n')
    with pytest.raises(BadInputError, match=message) as info:
        load_text(str(path))
    assert str(info.value).startswith(str(path)) and "\n" not in str(info.value)


def test_jsonl_without_documents_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "e.jsonl"
    path.write_text('{"text": ""}\n\n')
    with pytest.raises(BadInputError, match="no non-empty 'text' values"):
        load_text(str(path))


def test_named_sets_are_listed_with_descriptions() -> None:
    named = list_named_sets()
    expected = {"austen", "pydocs", "calib-mix", "wikitext2", "c4", "pg19", *(f"austen-{n}" for n in NOVELS)}
    assert set(named) == expected and all(isinstance(d, str) and d for d in named.values())


def test_novel_lines_are_joined_with_newlines(fake_packages: Path) -> None:
    source = load_text("austen-emma")
    assert source.text == "EMMA\n\n\nFirst line of emma.\nsecond line.\n\nThe end."
    assert source.meta["packages"] == {"r-cran-janeaustenr": "1.0.0-1"}
    assert source.meta["files"] == ["usr/lib/R/site-library/janeaustenr/data/Rdata.rdb#emma"]


def test_austen_joins_six_novels_and_second_load_uses_the_text_cache(fake_packages: Path) -> None:
    first = load_text("austen")
    assert first.text.startswith("EMMA\n") and first.text.count("The end.") == 6
    assert "The end.\n\nMANSFIELDPARK\n" in first.text and first.text.endswith("The end.")
    assert [part["name"] for part in first.meta["parts"]] == [f"austen-{n}" for n in NOVELS]
    data = fake_packages / "debian/r-cran-janeaustenr/usr/lib/R/site-library/janeaustenr/data"
    (data / "Rdata.rdb").unlink()  # decoded texts now come from the cache only
    second = load_text("austen")
    assert second.text == first.text and second.meta["sha256"] == first.meta["sha256"]
    assert (fake_packages / "texts/r-cran-janeaustenr_1.0.0-1/austen-emma.txt").is_file()


def test_pydocs_in_sorted_path_order(fake_packages: Path) -> None:
    source = load_text("pydocs")
    titles = [line for line in source.text.splitlines() if line.startswith("Doc ")]
    assert titles == ["Doc a/y.rst.txt", "Doc a/z.rst.txt", "Doc b.rst.txt", "Doc c/x.rst.txt"]
    assert source.meta["packages"] == {"python3.11-doc": "3.11.2-6"}


def test_calib_mix_is_two_novels_and_a_balanced_share_of_docs(fake_packages: Path) -> None:
    source = load_text("calib-mix")
    parts = source.meta["parts"]
    assert [p["name"] for p in parts[:2]] == ["austen-emma", "austen-mansfieldpark"]
    assert parts[2]["name"].startswith("pydocs-every-")
    assert (
        source.text.startswith("EMMA\n")
        and "MANSFIELDPARK" in source.text
        and "Doc a/y.rst.txt" in source.text
    )
    assert set(source.meta["packages"]) == {"r-cran-janeaustenr", "python3.11-doc"}


def test_a_path_like_spec_beats_a_set_name(fake_packages: Path, tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "austen").mkdir()
    (tmp_path / "austen" / "mine.txt").write_text("my own austen")
    monkeypatch.chdir(tmp_path)
    assert load_text("./austen").text == "my own austen"
    assert load_text("austen").text.startswith("EMMA")


def test_hub_sets_without_datasets_name_offline_alternatives(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails as if not installed
    for name in ("wikitext2", "c4", "pg19"):
        with pytest.raises(BadInputError, match=rf"^dataset '{name}' needs the `datasets` package") as info:
            load_text(name)
        assert "offline alternatives: austen-prideprejudice" in str(info.value) and "\n" not in str(
            info.value
        )


def test_unreachable_hub_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    class OfflineDatasets:
        __version__ = "0"

        @staticmethod
        def load_dataset(*args, **kwargs):
            raise ConnectionError(
                "Couldn't reach 'wikitext' on the Hub (LocalEntryNotFoundError)\nmore detail"
            )

    monkeypatch.setitem(sys.modules, "datasets", OfflineDatasets)
    with pytest.raises(
        BadInputError, match=r"^dataset 'wikitext2' cannot be reached \(Couldn't reach"
    ) as info:
        load_text("wikitext2")
    assert "\n" not in str(info.value) and "calib-mix" in str(info.value)


@pytest.mark.slow
def test_real_offline_sets() -> None:
    pride = load_text("austen-prideprejudice")
    assert pride.text.startswith("PRIDE AND PREJUDICE\n\nBy Jane Austen")
    assert 12_500 < pride.meta["lines"] < 13_500
    austen = load_text("austen")
    assert len(austen.meta["parts"]) == 6 and pride.text in austen.text
    docs = load_text("pydocs")
    assert len(docs.meta["files"]) > 400 and "The Python Tutorial" in docs.text
    mix = load_text("calib-mix")
    prose = sum(p["chars"] for p in mix.meta["parts"][:2])
    assert 0.7 < mix.meta["parts"][2]["chars"] / prose < 1.4  # about half prose, half technical


def test_unwritable_text_cache_still_loads(fake_packages: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from effllm_tools.data import offline_sets

    def refuse(path: Path, content: str) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(offline_sets, "_write_atomic", refuse)
    assert load_text("austen-persuasion").text.startswith("PERSUASION\n")
    assert not (fake_packages / "texts").exists()
