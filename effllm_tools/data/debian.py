"""Fetch a Debian package once and keep it unpacked in effllm's cache (research/testbed.md).

The offline text sets come from Debian packages, unpacked with ``dpkg-deb -x`` and never installed
(installing would pull R or upgrade Python). The unpacked tree lives at
``$EFFLLM_CACHE/debian/<name>/`` (default cache ``~/.cache/effllm``) beside a small JSON record of
the package version and the ``.deb``'s SHA-256. It appears atomically: everything is built in a
temporary folder beside it and renamed at the end, so an interrupted fetch leaves nothing half-done.

Where ``$EFFLLM_DEB_DIR`` names a folder holding ``<name>_*.deb`` (for machines without apt or a
mirror), that file is unpacked instead of running ``apt-get download``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from effllm_tools.cache import cache_root
from effllm_tools.errors import BadInputError

PACKAGE_RECORD = ".effllm-package.json"
_COMMAND_TIMEOUT_S = 900
_MISSING_LISTS_HINTS = ("Unable to locate package", "has no installation candidate", "404", "Failed to fetch")


def package_record(root: Path) -> dict[str, Any]:
    """The record written beside an unpacked package: name, version, deb file name, deb_sha256."""
    return json.loads((Path(root) / PACKAGE_RECORD).read_text(encoding="utf-8"))


def ensure_debian_package(name: str, *, needed_for: str | None = None) -> Path:
    """The unpacked root folder of Debian package ``name``, fetching and unpacking it on first use.

    ``needed_for`` (e.g. ``"offline text set 'austen'"``) opens the one-line error message.
    Raises ``BadInputError`` when apt-get or dpkg-deb is missing or the download fails.
    """
    target = cache_root() / "debian" / name
    if (target / PACKAGE_RECORD).is_file():
        return target
    prefix = f"{needed_for} needs the Debian package {name}" if needed_for else f"Debian package {name}"
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        workspace = tempfile.TemporaryDirectory(prefix=f".{name}.", dir=target.parent)
    except OSError as exc:
        raise BadInputError(
            f"{prefix}: cannot write the cache folder {target.parent} ({exc.strerror or exc}); set EFFLLM_CACHE"
        ) from exc
    with workspace as tmp:
        deb = _fetch_deb(name, Path(tmp) / "download", prefix)
        unpacked = Path(tmp) / "root"
        _run(["dpkg-deb", "-x", str(deb), str(unpacked)], prefix, "dpkg-deb -x failed")
        record = {"name": name, "version": _deb_version(deb, prefix), "deb": deb.name}
        record["deb_sha256"] = hashlib.sha256(deb.read_bytes()).hexdigest()
        (unpacked / PACKAGE_RECORD).write_text(json.dumps(record, indent=1), encoding="utf-8")
        _publish(unpacked, target)
    return target


def _publish(unpacked: Path, target: Path) -> None:
    """Rename the finished tree into place; another process that got there first wins."""
    if target.exists() and not (target / PACKAGE_RECORD).is_file():
        shutil.rmtree(target)  # left by an older, interrupted layout: no record, so never complete
    try:
        unpacked.rename(target)
    except OSError:
        if not (target / PACKAGE_RECORD).is_file():
            raise


def _fetch_deb(name: str, folder: Path, prefix: str) -> Path:
    """The package's .deb in ``folder``: from ``$EFFLLM_DEB_DIR`` if it has one, else apt-get."""
    folder.mkdir(parents=True)
    local = _local_deb(name)
    if local is not None:
        return Path(shutil.copy2(local, folder / local.name))
    if shutil.which("apt-get") is None:
        raise BadInputError(
            f"{prefix}: apt-get is not available on this machine; set EFFLLM_DEB_DIR to a folder "
            f"holding {name}_*.deb, or pass the text as a file or folder"
        )
    result = _apt_get_download(name, folder)
    if result.returncode != 0 and any(hint in result.stderr for hint in _MISSING_LISTS_HINTS):
        _apt_get_update()  # package lists missing or stale: refresh once, then retry
        result = _apt_get_download(name, folder)
    if result.returncode != 0:
        raise BadInputError(f"{prefix}: apt-get download failed: {_last_line(result.stderr)}")
    debs = sorted(folder.glob(f"{name}_*.deb"))
    if not debs:
        raise BadInputError(f"{prefix}: apt-get download produced no {name}_*.deb")
    return debs[-1]


def _local_deb(name: str) -> Path | None:
    """The newest-sorting ``<name>_*.deb`` in ``$EFFLLM_DEB_DIR``, if that variable is set."""
    folder = os.environ.get("EFFLLM_DEB_DIR")
    if not folder:
        return None
    debs = sorted(Path(folder).expanduser().glob(f"{name}_*.deb"))
    return debs[-1] if debs else None


def _apt_get_download(name: str, folder: Path) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            ["apt-get", "download", name],
            cwd=folder,
            capture_output=True,
            text=True,
            timeout=_COMMAND_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess([], 1, "", f"timed out after {_COMMAND_TIMEOUT_S} s")


def _apt_get_update() -> None:
    """Best effort: a failure (not root, offline) shows in the retried download's error."""
    try:
        subprocess.run(
            ["apt-get", "update"], capture_output=True, text=True, timeout=_COMMAND_TIMEOUT_S, check=False
        )
    except subprocess.TimeoutExpired:
        pass


def _deb_version(deb: Path, prefix: str) -> str:
    return _run(["dpkg-deb", "-f", str(deb), "Version"], prefix, "dpkg-deb -f failed").strip()


def _run(command: list[str], prefix: str, what: str) -> str:
    """Run a dpkg-deb command and return its stdout; a missing tool or a failure is one line."""
    if shutil.which(command[0]) is None:
        raise BadInputError(f"{prefix}: {command[0]} is not available on this machine (Debian's dpkg)")
    result = subprocess.run(command, capture_output=True, text=True, timeout=_COMMAND_TIMEOUT_S, check=False)
    if result.returncode != 0:
        raise BadInputError(f"{prefix}: {what}: {_last_line(result.stderr)}")
    return result.stdout


def _last_line(stderr: str) -> str:
    """The most telling line of a tool's stderr (apt puts the error last), never a multi-line blob."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("E:")]
    return (errors or lines or ["no error output"])[-1]
