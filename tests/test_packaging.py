"""Packaging: namespaced import names only, every package listed, transformers not confused."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import REPO

MAPPING = {"effllm_cli": "cli", "effllm_tools": "effllm_tools", "effllm_kernels": "effllm_kernels"}


def test_every_package_folder_is_listed_in_pyproject():
    tomllib = pytest.importorskip("tomllib")
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = set()
    for name, folder in MAPPING.items():
        for init in (REPO / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(REPO / folder)
            found.add(".".join([name, *rel.parts]))
    assert listed == found


def test_no_folder_of_the_repository_shadows_hugging_faces_kernels_package():
    # transformers (>= 5.2x requires Hugging Face's `kernels`) imports `kernels` at import time; with the
    # repository as working directory (sys.path[0] == "") a folder of ours by that name would shadow it.
    assert not (REPO / "kernels").exists()
    code = ("import effllm_tools, effllm_kernels, effllm_cli\n"
            "import importlib.util, pathlib\n"
            "import transformers.activations\n"
            "from transformers import AutoConfig\n"
            "spec = importlib.util.find_spec('kernels')\n"
            "here = pathlib.Path.cwd().resolve()\n"
            "assert spec is None or pathlib.Path(spec.origin).resolve().parent.parent != here, spec.origin\n"
            "assert effllm_kernels.__name__ == 'effllm_kernels'\n"
            "print('ok')")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


def test_console_script_entry_point():
    from importlib.metadata import entry_points

    (ep,) = [e for e in entry_points(group="console_scripts") if e.name == "effllm"]
    assert ep.value == "effllm_cli.main:main"
