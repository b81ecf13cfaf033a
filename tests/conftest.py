"""Shared fixtures. Environment for offline, quiet, reproducible tests is set before anything imports Ray."""

from __future__ import annotations

import os
import socket
import tempfile

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def one_torch_thread():
    """One intra-op torch thread for the test: several test processes share two cores here, and their
    threads would spin against each other."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray cluster for the whole test session (never two at once; no xdist with Ray tests).

    4 logical CPUs on a 2-core box: Train workers and Ray Data must both get CPUs or the data feed starves.
    """
    ray = pytest.importorskip("ray")
    tmp = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short path: Ray's unix sockets have a length limit
    if not ray.is_initialized():
        ray.init(
            num_cpus=4,
            include_dashboard=False,
            object_store_memory=512 * 1024**2,
            _temp_dir=tmp,
            log_to_driver=False,
        )
        from ray.data import DataContext

        DataContext.get_current().enable_progress_bars = False
    yield ray
    try:
        from ray import serve

        serve.shutdown()
    except Exception:
        pass
    ray.shutdown()
