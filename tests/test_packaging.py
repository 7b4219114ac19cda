"""Packaging: namespaced import names only, every package listed, transformers not confused."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import REPO

MAPPING = {"effllm_cli": "cli", "effllm_tools": "effllm_tools", "effllm_kernels": "kernels"}


def test_every_package_folder_is_listed_in_pyproject():
    tomllib = pytest.importorskip("tomllib")
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = set()
    for name, folder in MAPPING.items():
        for init in (REPO / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(REPO / folder)
            found.add(".".join([name, *rel.parts]))
    assert listed == found


def test_transformers_does_not_see_a_kernels_package_from_the_repository():
    # The repository holds a folder named kernels/; with it as working directory (sys.path[0] == "")
    # transformers must still report that Hugging Face's `kernels` package is absent.
    code = ("import effllm_tools, effllm_kernels, effllm_cli\n"
            "from transformers.utils.import_utils import is_kernels_available\n"
            "import importlib.util\n"
            "assert effllm_kernels.__name__ == 'effllm_kernels'\n"
            "print(is_kernels_available())")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"


def test_console_script_entry_point():
    from importlib.metadata import entry_points

    (ep,) = [e for e in entry_points(group="console_scripts") if e.name == "effllm"]
    assert ep.value == "effllm_cli.main:main"
