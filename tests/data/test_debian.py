"""ensure_debian_package: unpack once into the cache, atomically, and fail with one clear line."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from effllm_tools.data import debian
from effllm_tools.data.debian import PACKAGE_RECORD, cache_root, ensure_debian_package
from effllm_tools.errors import BadInputError

needs_dpkg = pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="needs Debian's dpkg-deb")


def build_deb(folder: Path, name: str = "effllm-test-text", version: str = "1.2-3") -> Path:
    """A tiny real .deb holding usr/share/<name>/hello.txt, built with dpkg-deb --build."""
    tree = folder / "tree"
    (tree / "DEBIAN").mkdir(parents=True)
    control = f"Package: {name}\nVersion: {version}\nArchitecture: all\nMaintainer: t <t@t>\nDescription: t\n"
    (tree / "DEBIAN" / "control").write_text(control)
    (tree / "usr/share" / name).mkdir(parents=True)
    (tree / "usr/share" / name / "hello.txt").write_text("hello from a deb\n")
    deb = folder / f"{name}_{version}_all.deb"
    subprocess.run(["dpkg-deb", "--build", str(tree), str(deb)], check=True, capture_output=True)
    return deb


def test_cache_root_follows_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("EFFLLM_CACHE", str(tmp_path / "c"))
    assert cache_root() == tmp_path / "c"
    monkeypatch.delenv("EFFLLM_CACHE")
    assert cache_root() == Path.home() / ".cache" / "effllm"


@needs_dpkg
def test_unpacks_once_with_a_record(isolated_cache: Path, tmp_path: Path, monkeypatch) -> None:
    debs = tmp_path / "debs"
    debs.mkdir()
    build_deb(debs)
    monkeypatch.setenv("EFFLLM_DEB_DIR", str(debs))
    root = ensure_debian_package("effllm-test-text")
    assert root == isolated_cache / "debian" / "effllm-test-text"
    assert (root / "usr/share/effllm-test-text/hello.txt").read_text() == "hello from a deb\n"
    record = json.loads((root / PACKAGE_RECORD).read_text())
    assert record["version"] == "1.2-3" and len(record["deb_sha256"]) == 64
    assert [p.name for p in (isolated_cache / "debian").iterdir()] == ["effllm-test-text"]  # no temp left
    shutil.rmtree(debs)  # a second call must not fetch again
    assert ensure_debian_package("effllm-test-text") == root


@needs_dpkg
def test_incomplete_leftover_is_replaced(isolated_cache: Path, tmp_path: Path, monkeypatch) -> None:
    leftover = isolated_cache / "debian" / "effllm-test-text"
    (leftover / "usr").mkdir(parents=True)  # no record: an interrupted older attempt
    build_deb(tmp_path)
    monkeypatch.setenv("EFFLLM_DEB_DIR", str(tmp_path))
    root = ensure_debian_package("effllm-test-text")
    assert (root / PACKAGE_RECORD).is_file() and (root / "usr/share/effllm-test-text/hello.txt").is_file()


def test_missing_apt_get_is_one_clear_line(isolated_cache: Path, monkeypatch) -> None:
    monkeypatch.setattr(debian.shutil, "which", lambda tool: None)
    with pytest.raises(BadInputError) as info:
        ensure_debian_package("r-cran-janeaustenr", needed_for="offline text set 'austen'")
    message = str(info.value)
    assert message.startswith("offline text set 'austen' needs the Debian package r-cran-janeaustenr: ")
    assert "apt-get is not available" in message and "\n" not in message
    assert not (isolated_cache / "debian" / "r-cran-janeaustenr").exists()


def test_failed_download_updates_lists_once_then_reports(isolated_cache: Path, monkeypatch) -> None:
    calls: list[str] = []

    def failing_download(name: str, folder: Path) -> subprocess.CompletedProcess[str]:
        calls.append("download")
        stderr = "W: some warning\nE: Unable to locate package r-cran-janeaustenr\n"
        return subprocess.CompletedProcess(["apt-get"], 100, "", stderr)

    monkeypatch.setattr(debian.shutil, "which", lambda tool: f"/usr/bin/{tool}")
    monkeypatch.setattr(debian, "_apt_get_download", failing_download)
    monkeypatch.setattr(debian, "_apt_get_update", lambda: calls.append("update"))
    with pytest.raises(BadInputError) as info:
        ensure_debian_package("r-cran-janeaustenr", needed_for="offline text set 'austen'")
    assert calls == ["download", "update", "download"]
    assert str(info.value) == (
        "offline text set 'austen' needs the Debian package r-cran-janeaustenr: "
        "apt-get download failed: E: Unable to locate package r-cran-janeaustenr"
    )
    assert list((isolated_cache / "debian").iterdir()) == []  # the temp folder is gone


def test_other_download_failures_do_not_update(isolated_cache: Path, monkeypatch) -> None:
    calls: list[str] = []

    def failing_download(name: str, folder: Path) -> subprocess.CompletedProcess[str]:
        calls.append("download")
        return subprocess.CompletedProcess(
            ["apt-get"], 100, "", "E: Could not open file - open (13: Permission denied)"
        )

    monkeypatch.setattr(debian.shutil, "which", lambda tool: f"/usr/bin/{tool}")
    monkeypatch.setattr(debian, "_apt_get_download", failing_download)
    monkeypatch.setattr(debian, "_apt_get_update", lambda: calls.append("update"))
    with pytest.raises(
        BadInputError, match=r"^Debian package foo: apt-get download failed: E: Could not open"
    ):
        ensure_debian_package("foo")
    assert calls == ["download"]


def test_unwritable_cache_is_one_clear_line(tmp_path: Path, monkeypatch) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("EFFLLM_CACHE", str(blocker / "cache"))
    with pytest.raises(
        BadInputError, match=r"^Debian package foo: cannot write the cache folder .*set EFFLLM_CACHE$"
    ):
        ensure_debian_package("foo")
