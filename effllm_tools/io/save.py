"""Write checkpoints atomically: a temporary directory beside the target, renamed at the end.

The input is never written to, an existing output is refused without ``overwrite``, and an error
or Ctrl-C leaves no partial directory behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from effllm_tools.errors import BadInputError

PROVENANCE_FILE = "effllm_provenance.json"
RECIPE_FILE = "effllm_recipe.yaml"
MAX_SHARD_SIZE = "2GB"


def check_output_path(out: Path, *, overwrite: bool, inputs: list[Path]) -> None:
    """Refuse an output that overlaps an input or the working directory (``-o ""`` or ``-o .``), that
    exists (without overwrite), or that ``--overwrite`` would replace although it is neither empty nor
    an effllm output (a user's folder is never deleted)."""
    out = out.expanduser().resolve()
    for src in inputs:
        src = src.resolve()
        if out == src or src in out.parents or out in src.parents:
            raise BadInputError(f"output {out} overlaps the input {src}; choose another -o/--output")
    cwd = Path.cwd().resolve()
    if out == cwd or out in cwd.parents:
        raise BadInputError(f"output {out} is the working directory or contains it; choose another -o/--output")
    if out.exists() and not overwrite:
        raise BadInputError(f"output {out} already exists; pass --overwrite to replace it")
    if out.exists() and not out.is_dir():
        raise BadInputError(f"output {out} exists and is not a directory")
    if out.exists() and not (out / PROVENANCE_FILE).is_file() and any(out.iterdir()):
        raise BadInputError(f"output {out} exists and is not an effllm output (no {PROVENANCE_FILE}); "
                            "--overwrite replaces only effllm outputs: remove it or choose another -o/--output")
    parent = out.parent
    while not parent.exists() and parent != parent.parent:  # the folder the output (and its state) goes into
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise BadInputError(f"output {out}: cannot write into {parent} (read-only or no permission); "
                            "choose another -o/--output")


@contextlib.contextmanager
def output_lock(out: Path) -> Iterator[None]:
    """Hold an exclusive lock on the output path for one run (a ``.NAME.lock`` file beside it, removed
    at the end; the kernel drops the lock if the process dies): a second run on the same path is bad
    input at once, not a run that deletes the first one's resume state mid-way. No-op without fcntl."""
    try:
        import fcntl
    except ImportError:  # not POSIX
        yield
        return
    out = out.expanduser().resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    lock = out.parent / f".{out.name}.lock"
    fd = os.open(lock, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise BadInputError(f"output {out}: another effllm run is writing it; wait for it or choose another "
                                "-o/--output") from None
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                lock.unlink()
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_directory(out: Path, *, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary directory that becomes ``out`` only if the block finishes."""
    out = out.expanduser().resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield tmp
        _public(tmp)
        if out.exists():
            if not overwrite:
                raise BadInputError(f"output {out} appeared while writing; pass --overwrite to replace it")
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / "x")
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _public(tmp: Path) -> None:
    """Give the finished directory and its files the permissions of a plain ``mkdir`` / ``open``
    under the current umask (``mkdtemp`` makes the directory private, some writers their files too)."""
    mask = _umask()
    tmp.chmod(0o777 & ~mask)
    for path in tmp.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


def write_checkpoint(model: Any, tokenizer: Any, out: Path, *, overwrite: bool, provenance: dict[str, Any],
                     recipe: dict[str, Any]) -> Path:
    """Save model, tokenizer, generation config, recipe, provenance and a model card."""
    with atomic_directory(out, overwrite=overwrite) as tmp:
        model.save_pretrained(str(tmp), max_shard_size=MAX_SHARD_SIZE)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        (tmp / RECIPE_FILE).write_text(yaml.safe_dump(recipe, sort_keys=False))
        (tmp / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2, default=str) + "\n")
        (tmp / "README.md").write_text(model_card(provenance, recipe))
    return out.expanduser().resolve()


def model_card(provenance: dict[str, Any], recipe: dict[str, Any]) -> str:
    stages = provenance.get("stages", [])
    lines = [
        "---",
        f"base_model: {provenance.get('source', {}).get('spec', 'unknown')}",
        "library_name: transformers",
        "tags: [effllm]",
        "---",
        "",
        f"# Compressed with effllm {provenance.get('effllm_version', '')}",
        "",
        "| stage | method | key metrics |",
        "|---|---|---|",
    ]
    for i, st in enumerate(stages):
        metrics = ", ".join(f"{k}={_fmt(v)}" for k, v in st.get("metrics", {}).items())
        lines.append(f"| {i} | {st['method']} | {metrics} |")
    lines += [
        "",
        "Load it with `import effllm_tools` then `AutoModelForCausalLM.from_pretrained(path)`,",
        "or `effllm_tools.load(path)`. Inspect it with `effllm inspect PATH`.",
        "",
        "## Recipe",
        "",
        "```yaml",
        yaml.safe_dump(recipe, sort_keys=False).rstrip(),
        "```",
        "",
    ]
    return "\n".join(lines)


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)
