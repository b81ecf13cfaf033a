"""``tnlbt serve`` stops cleanly on SIGTERM (``docker stop``, Kubernetes, systemd) and SIGINT: a real process,
a real signal, exit 0 with one line, no Ray stack dump, and a request in flight finishes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import requests
from conftest import free_port
from test_search import build_tiny_index, make_tiny_run

pytestmark = pytest.mark.ray  # its own local Ray in the child process: ~30-90 s on 2 busy cores


def _start(run, port: int, tmp_path) -> tuple[subprocess.Popen[str], list[str]]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
           "GRADIO_ANALYTICS_ENABLED": "False", "TNLBT_CACHE_DIR": str(tmp_path / "cache")}
    env.pop("RAY_ADDRESS", None)  # a private cluster, not the test session's
    proc = subprocess.Popen([sys.executable, "-m", "tnlbt", "serve", "--run", str(run), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
    return proc, lines


@pytest.mark.parametrize("sig", [signal.SIGTERM])
def test_serve_exits_zero_on_sigterm_after_finishing_in_flight_work(tmp_path, sig):
    run = make_tiny_run(tmp_path, n_recipes=12)
    build_tiny_index(run, store_kind="edge")
    port = free_port()
    proc, lines = _start(run, port, tmp_path)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and not any(ln.startswith("Ctrl-C to stop") for ln in lines):
            assert proc.poll() is None, "".join(lines)[-3000:]
            time.sleep(1)
        assert any(ln.startswith("ready:") for ln in lines), "".join(lines)[-3000:]
        base = f"http://127.0.0.1:{port}"
        results: list[int] = []
        inflight = threading.Thread(
            target=lambda: results.append(
                requests.post(f"{base}/v1/search/text", json={"text": "tomato soup", "k": 3}, timeout=60).status_code
            )
        )
        inflight.start()
        time.sleep(0.2)  # the request is on its way when the signal lands
        t0 = time.time()
        proc.send_signal(sig)
        rc = proc.wait(timeout=90)
        took = time.time() - t0
        inflight.join(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out = "".join(lines)
    assert rc == 0, out[-3000:]
    assert f"[serve] {sig.name}: stopped" in out
    assert "Stack trace" not in out and "SIGTERM received" not in out and "Traceback" not in out, out[-3000:]
    assert results == [200], results  # the request in flight finished
    assert took < 60, took
