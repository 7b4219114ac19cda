"""The CLI's own exit codes agree with the library's table (and the README's)."""

from __future__ import annotations

from effllm_cli import output
from effllm_tools.errors import ExitCode
from tests.conftest import REPO


def test_cli_constants_match_the_library():
    assert output.EXIT_INTERNAL == ExitCode.INTERNAL
    assert output.EXIT_OOM == ExitCode.OUT_OF_MEMORY
    assert output.EXIT_INTERRUPTED == ExitCode.INTERRUPTED


def test_readme_documents_every_exit_code():
    readme = (REPO / "README.md").read_text()
    table = readme[readme.index("## Exit codes"):]
    for code in ExitCode:
        assert f"| {int(code)} |" in table, code
