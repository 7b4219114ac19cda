"""Tiny random decoder-only models for the calibration pipeline tests (fp32, eval mode)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import torch
from torch import nn

from tests.tiny_models import ARCH_NAMES, CONFIGS, NUM_SAMPLES, SEQ_LEN, VOCAB, build_model  # noqa: F401


@pytest.fixture(scope="session", autouse=True)
def one_cpu_thread() -> Iterator[None]:
    """The models are tiny: several intra-op threads only spin, and on a busy 2-core machine
    they made this folder ten times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def calib_ids() -> torch.Tensor:
    """Token ids ``[NUM_SAMPLES, SEQ_LEN]``."""
    generator = torch.Generator().manual_seed(1)
    return torch.randint(0, VOCAB, (NUM_SAMPLES, SEQ_LEN), generator=generator)


@pytest.fixture(params=ARCH_NAMES)
def arch_name(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def model(arch_name: str) -> nn.Module:
    return build_model(arch_name)


@pytest.fixture
def build() -> Callable[..., nn.Module]:
    """``build(name, attn="sdpa", seed=0)``: see :func:`build_model` (test modules cannot import
    conftest under ``--import-mode=importlib``)."""
    return build_model
