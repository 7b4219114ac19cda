"""stdout for results, stderr for everything else; errors become one line and an exit code."""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import math
import os
import sys
import traceback
from collections.abc import Iterable, Iterator
from importlib.metadata import PackageNotFoundError, version
from typing import Any, TypeVar

from rich.console import Console
from rich.logging import RichHandler
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

T = TypeVar("T")
SCHEMA = "effllm.result/1"

# The exit codes raised here rather than by an EffllmError (README "Exit codes"; effllm_tools.errors.ExitCode
# holds them all, but importing effllm_tools loads torch and transformers, which --version must not wait for).
EXIT_INTERNAL, EXIT_OOM, EXIT_INTERRUPTED, EXIT_TERMINATED = 1, 3, 130, 143


#: OSError numbers that mean the output cannot be written (read-only, permission, full disk or quota).
_WRITE_ERRNOS = {errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EDQUOT}


class Terminated(KeyboardInterrupt):
    """SIGTERM (``timeout``, a cancelled CI job, ``kill``), raised in the main thread like Ctrl-C so that
    the same clean-up runs: no partial output is left (``main`` installs the handler)."""


def effllm_version() -> str:
    try:
        return version("effllm")
    except PackageNotFoundError:
        return "unknown"


def strict_json(value: Any) -> Any:
    """``value`` with every non-finite float (NaN, inf: not JSON) replaced by None, so that stdout under
    ``--json`` parses in every JSON reader, not only Python's and jq's."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


class Ui:
    """Per-invocation output settings: verbosity, JSON mode, the stderr console."""

    def __init__(self, *, quiet: bool = False, verbose: bool = False, json_mode: bool = False, command: str = "") -> None:
        self.quiet, self.verbose, self.json_mode, self.command = quiet, verbose, json_mode, command
        self.result_printed = False
        self.err = Console(stderr=True, no_color=bool(os.environ.get("NO_COLOR")) or None)
        level = logging.WARNING if quiet else (logging.DEBUG if verbose else logging.INFO)
        if self.err.is_terminal:
            handler: logging.Handler = RichHandler(console=self.err, show_time=False, show_path=False, markup=False)
            fmt = "%(message)s"
        else:  # a log file or a pipe: one unwrapped, unpadded line per record
            handler, fmt = logging.StreamHandler(sys.stderr), "%(levelname)s %(message)s"
        logging.basicConfig(level=level, handlers=[handler], format=fmt, force=True)
        for noisy in ("transformers", "accelerate", "huggingface_hub", "torch"):
            logging.getLogger(noisy).setLevel(logging.ERROR if not verbose else logging.INFO)
        if not self.show_progress:  # transformers' own tqdm bars (weight loading, GGUF conversion) too
            os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
            os.environ["TQDM_DISABLE"] = "1"  # tqdm >= 4.66: the GGUF converter calls tqdm directly
        if not verbose:
            os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
            os.environ.setdefault("HF_HUB_VERBOSITY", "error")  # its retry warnings bypass the logger levels above
            with contextlib.suppress(Exception):
                import warnings

                warnings.filterwarnings("ignore")

    @property
    def show_progress(self) -> bool:
        return not self.quiet and self.err.is_terminal

    def result(self, payload: dict[str, Any], plain: str | None, status: str = "ok") -> None:
        """Print the command's result on stdout: one JSON object, or plain text."""
        self.result_printed = True
        if self.json_mode:
            obj = {"schema": SCHEMA, "effllm_version": effllm_version(), "command": self.command, "status": status,
                   **payload}
            sys.stdout.write(json.dumps(strict_json(obj), default=str, allow_nan=False) + "\n")
        elif plain is not None:
            sys.stdout.write(plain + "\n")
        sys.stdout.flush()

    def fail(self, code: int, message: str) -> int:
        self.err.print(f"effllm: error: {message}", markup=False, highlight=False, soft_wrap=True)
        if self.json_mode and not self.result_printed:  # stdout holds one JSON object, never two
            obj = {"schema": SCHEMA, "effllm_version": effllm_version(), "command": self.command,
                   "status": "error", "exit_code": code, "error": message}
            sys.stdout.write(json.dumps(obj) + "\n")
        return code


class RichReporter:
    """effllm_tools.reporting.Reporter drawn with rich progress bars on stderr (only on a terminal)."""

    def __init__(self, ui: Ui) -> None:
        self.ui = ui
        self.log = logging.getLogger("effllm")

    def progress_iter(self, items: Iterable[T], label: str, total: int | None = None) -> Iterator[T]:
        if not self.ui.show_progress:
            yield from items
            return
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TimeRemainingColumn())
        with Progress(*columns, console=self.ui.err, transient=True) as progress:
            task = progress.add_task(label, total=total)
            for item in items:
                yield item
                progress.advance(task)

    def info(self, message: str) -> None:
        self.log.info(message)

    def progress_note(self, message: str) -> None:
        if not self.ui.show_progress:  # on a terminal the bar says it; in a log or pipe, a line does
            self.log.info(message)

    def warning(self, message: str) -> None:
        self.log.warning(message)


def run_guarded(ui: Ui, body: Any) -> int:
    """Run ``body()``; map every failure to one stderr line and its exit code."""
    try:
        body()
        return 0
    except Terminated:
        return ui.fail(EXIT_TERMINATED, "terminated (SIGTERM); no output was written")
    except KeyboardInterrupt:
        return ui.fail(EXIT_INTERRUPTED, "interrupted; no output was written")
    except BrokenPipeError:  # the reader of stdout went away (`| head -0`): the work itself is done
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as err:  # noqa: BLE001 - the one place that maps every error
        from effllm_tools.errors import EffllmError, ExitCode, KernelUnavailableError

        if ui.verbose:
            traceback.print_exc(file=sys.stderr)
        if isinstance(err, EffllmError):
            return ui.fail(int(err.exit_code), str(err))
        if isinstance(err, KernelUnavailableError):  # EFFLLM_KERNELS=triton asked for a kernel that cannot run
            return ui.fail(int(ExitCode.UNSUPPORTED), str(err).splitlines()[0])
        import torch

        if isinstance(err, OSError) and err.errno in _WRITE_ERRNOS:  # the output's disk, not a bug
            where = f" {err.filename}" if err.filename else ""
            return ui.fail(2, f"cannot write{where}: {os.strerror(err.errno)}; choose another -o/--output or free space")
        if isinstance(err, torch.OutOfMemoryError | MemoryError):
            return ui.fail(EXIT_OOM, f"out of memory ({str(err).splitlines()[0][:160] if str(err) else type(err).__name__}); "
                                     "try --device cpu, a smaller --batch-size or fewer calibration samples")
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        hint = "" if ui.verbose else " (run with -v for the traceback)"
        return ui.fail(EXIT_INTERNAL, f"internal error: {type(err).__name__}: {first[:300]}{hint}")
