"""Where effllm caches what it fetches or converts (texts, the demo model): never inside a repository."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """effllm's cache folder: ``$EFFLLM_CACHE``, else ``~/.cache/effllm``."""
    configured = os.environ.get("EFFLLM_CACHE")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "effllm"
