"""Kernel tests run the Triton kernels on the CPU through Triton's interpreter when no GPU is there.

``TRITON_INTERPRET`` must be set before any ``@triton.jit`` function is defined: the kernel modules
are imported lazily (``effllm_kernels.rtn`` imports them on the first Triton call), and pytest
imports this file before the test modules of this folder.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
