"""How the library reports progress and log lines without printing: the caller injects a Reporter."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")
log = logging.getLogger("effllm")


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
