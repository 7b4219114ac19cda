"""How the library reports progress and log lines without printing: the caller injects a Reporter."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")
log = logging.getLogger("effllm")


def format_duration(seconds: float) -> str:
    """A duration for log lines: seconds below 2 minutes, minutes below 2 hours, then hours."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


class Reporter:
    """Silent by default; the CLI passes one that draws rich progress bars on stderr."""

    def progress_iter(self, items: Iterable[T], label: str, total: int | None = None) -> Iterator[T]:
        yield from items

    def info(self, message: str) -> None:
        log.info(message)

    def progress_note(self, message: str) -> None:
        """Where a long loop stands (layers done, time left): a log line, for logs and scripts; a
        reporter that draws a progress bar may drop it."""
        log.info(message)

    def warning(self, message: str) -> None:
        log.warning(message)
