"""Choose between an op's Triton kernel and its pure-torch reference.

Every op with a kernel asks :func:`choose_backend` on each call. The environment variable
``EFFLLM_KERNELS`` (read on each call, so tests can flip it) decides:

* ``auto`` (default): the Triton kernel when the input lives on a CUDA device, Triton is importable
  and the op supports the case; the reference otherwise.
* ``triton``: always the kernel; an unsupported case is an error, not a silent fallback. On the
  CPU this works only under ``TRITON_INTERPRET=1`` (set before the kernel module is imported).
* ``reference``: always the reference.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Literal

import torch

ENV_VAR = "EFFLLM_KERNELS"
MODES = ("auto", "triton", "reference")
Backend = Literal["triton", "reference"]


class KernelUnavailableError(RuntimeError):
    """``EFFLLM_KERNELS=triton`` was asked for a case the kernel cannot run."""


def kernel_mode() -> str:
    """The validated value of ``EFFLLM_KERNELS`` (``auto`` when unset or empty)."""
    mode = os.environ.get(ENV_VAR, "").strip().lower() or "auto"
    if mode not in MODES:
        raise ValueError(f"{ENV_VAR}={mode!r}: expected one of {', '.join(MODES)}")
    return mode


def triton_importable() -> bool:
    """Whether the ``triton`` package is installed (it is absent on some platforms)."""
    return importlib.util.find_spec("triton") is not None


def interpreter_enabled() -> bool:
    """Whether Triton runs kernels on the CPU through its interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def choose_backend(op: str, x: torch.Tensor, unsupported: str | None = None) -> Backend:
    """Pick the backend for one call of ``op`` on input ``x``.

    Args:
        op: the op's name, for error messages.
        x: the main input; its device decides ``auto``.
        unsupported: why the kernel cannot run this case (dtype, format, ...), or None when it can.
    """
    mode = kernel_mode()
    if mode == "reference":
        return "reference"
    if mode == "auto":
        ok = x.is_cuda and unsupported is None and triton_importable()
        return "triton" if ok else "reference"
    if unsupported is not None:
        raise KernelUnavailableError(f"{ENV_VAR}=triton: {op} kernel cannot run this case: {unsupported}")
    if not triton_importable():
        raise KernelUnavailableError(f"{ENV_VAR}=triton: {op} needs the triton package")
    if not x.is_cuda and not interpreter_enabled():
        raise KernelUnavailableError(
            f"{ENV_VAR}=triton: {op} got a {x.device.type} tensor; off CUDA the kernel runs only under "
            "TRITON_INTERPRET=1"
        )
    return "triton"
