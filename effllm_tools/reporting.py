"""How the library reports progress and log lines without printing: the caller injects a Reporter."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")
log = logging.getLogger("effllm")


def format_duration(seconds: float) -> str:
    """A duration for log lines: seconds below 2 minutes, minutes below 2 hours, then hours."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def text_value(v: Any) -> str:
    """One value as the text reports write it: true / false / null, floats to 6 significant digits,
    lists in brackets."""
    if isinstance(v, bool) or v is None:
        return "null" if v is None else str(v).lower()
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(text_value(x) for x in v) + "]"
    return str(v)


def key_values(values: dict[str, Any] | None, skip: tuple[str, ...] = ()) -> str:
    """``key=value`` pairs of a mapping for the text reports (``inspect``, ``--dry-run``; --json keeps
    the mapping itself)."""
    return " ".join(f"{k}={text_value(v)}" for k, v in (values or {}).items() if k not in skip)


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
