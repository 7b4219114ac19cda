"""Hub ids without a reachable hub: a fast answer from the local cache or a one-line error.

The hub library retries for ~25 s before it gives up on a machine with no network, even when the
model sits in the local cache; effllm probes the endpoint once (``io.load.hub_reachable``) and then
asks the cache only (``local_files_only``).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time

import pytest

from effllm_tools.io import load
from tests.conftest import parse_json_stdout

UNREACHABLE = "http://127.0.0.1:9"  # the discard port: nothing listens, the connection is refused at once


PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy", "NO_PROXY",
              "no_proxy")


@pytest.fixture(autouse=True)
def _fresh_probe():
    load._HUB_PROBES.clear()
    yield
    load._HUB_PROBES.clear()


def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in PROXY_VARS:
        monkeypatch.delenv(var, raising=False)


def test_offline_mode_and_an_unreachable_endpoint_mean_unreachable(monkeypatch):
    from huggingface_hub import constants

    _no_proxy(monkeypatch)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert load.hub_reachable() is False
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", UNREACHABLE)
    assert load.hub_reachable() is False


def test_a_listening_endpoint_is_reachable_and_each_endpoint_is_probed(monkeypatch):
    """The answer is held per endpoint: a down endpoint does not make a later one look down."""
    from huggingface_hub import constants

    _no_proxy(monkeypatch)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", UNREACHABLE)
    assert load.hub_reachable() is False
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    try:
        monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
        assert load.hub_reachable() is True
    finally:
        server.close()


def test_a_probe_that_hangs_is_cut_at_the_deadline(monkeypatch):
    from huggingface_hub import constants

    _no_proxy(monkeypatch)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(load, "HUB_PROBE_TIMEOUT_S", 0.2)
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: time.sleep(5))  # a name lookup that hangs
    t0 = time.perf_counter()
    assert load.hub_reachable() is False
    assert time.perf_counter() - t0 < 2


def test_behind_a_proxy_the_hub_library_decides(monkeypatch):
    from huggingface_hub import constants

    _no_proxy(monkeypatch)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: pytest.fail("probed behind a proxy"))
    assert load.hub_reachable() is True


def test_unreachable_hub_asks_the_local_cache_only(monkeypatch):
    monkeypatch.setattr(load, "hub_reachable", lambda: False)
    assert load._hub_kwargs(load.ModelSource("some-org/model", "hub", None)) == {"local_files_only": True}
    monkeypatch.setattr(load, "hub_reachable", lambda: True)
    assert load._hub_kwargs(load.ModelSource("some-org/model", "hub", None)) == {}


def test_cached_hub_model_loads_with_the_hub_unreachable(tiny_llama, sample_text, tmp_path):
    """A model in the hub cache (HF_HUB_CACHE layout: refs/main -> snapshots/<commit>) evaluates with
    the endpoint unreachable and no HF_HUB_OFFLINE set, without the hub library's retries (a review
    timed the same call without the probe at 145 s; a minute is far above the probe's few seconds)."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--some-org--tiny-llama"
    shutil.copytree(tiny_llama, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_HUB") and k not in PROXY_VARS}
    env.update(HF_HUB_CACHE=str(tmp_path / "hub"), HF_ENDPOINT=UNREACHABLE, OMP_NUM_THREADS="1")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "effllm_cli.main", "eval-ppl", "some-org/tiny-llama", "--dataset",
                           str(sample_text), "--seqlen", "64", "--json"], capture_output=True, text=True, env=env,
                          timeout=300)
    took = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stderr
    assert parse_json_stdout(proc)["metrics"]["ppl"] > 1
    assert took < 60, f"{took:.0f} s: the hub library's retries ran"
