"""Errors that carry the documented exit code (README "Exit codes").

Library code raises these; the CLI turns them into one stderr line and the exit status.
"""

from __future__ import annotations

from enum import IntEnum

# The kernels' own error (they may not import effllm_tools): EFFLLM_KERNELS=triton asked for a
# kernel that cannot run the case. The CLI maps it to exit 4 like UnsupportedError.
from effllm_kernels.dispatch import KernelUnavailableError  # noqa: F401  (re-exported)


class ExitCode(IntEnum):
    OK = 0
    INTERNAL = 1
    BAD_INPUT = 2
    OUT_OF_MEMORY = 3
    UNSUPPORTED = 4
    QUALITY_GATE = 5
    INTERRUPTED = 130


class EffllmError(Exception):
    """Base class: ``str(err)`` is the one line the user sees."""

    exit_code: ExitCode = ExitCode.INTERNAL


class BadInputError(EffllmError):
    """A missing, corrupt or inconsistent input file, flag or recipe key (exit 2)."""

    exit_code = ExitCode.BAD_INPUT


class UnsupportedError(EffllmError):
    """A model architecture, method or option that effllm does not (yet) handle (exit 4)."""

    exit_code = ExitCode.UNSUPPORTED


class QualityGateError(EffllmError):
    """A measured metric failed a requested bound such as ``--max-ppl`` (exit 5)."""

    exit_code = ExitCode.QUALITY_GATE


class OutOfMemoryError(EffllmError):
    """Device or host memory ran out (exit 3)."""

    exit_code = ExitCode.OUT_OF_MEMORY
