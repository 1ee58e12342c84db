"""``uld-vllm serve ARGS`` on a free local port for as long as a ``with`` block runs."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from uld_vllm.errors import UldError


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(serve_args: list[str], log: Path, *, timeout: float = 600, env=None):
    """Yields the base URL once ``/health`` answers; the server's output goes to ``log``.

    A subprocess of the command users run (without ``--uld-adapter`` it is vLLM's own
    server), in its own process group so that its engine processes go down with it."""
    import httpx

    port = free_port()
    cmd = [sys.executable, "-m", "uld_vllm.cli", "serve", *serve_args,
           "--host", "127.0.0.1", "--port", str(port)]
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    try:
        while True:
            if proc.poll() is not None:
                raise UldError(f"the server exited with status {proc.returncode} before it "
                               "answered /health", f"see {log}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise UldError(f"the server did not answer /health in {timeout:.0f} s",
                               f"see {log}, or raise --startup-timeout")
            time.sleep(0.5)
        yield base
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)  # the group started above, nothing else
                proc.wait(timeout=30)


def leak_check(base: str, timeout: float = 30.0) -> dict:
    """What /health and /metrics say once the server is idle (or ``timeout`` is up): the
    aborts of cut streams reach the engine asynchronously."""
    import httpx  # the serving extra; plain `uld-vllm bench` does not need it

    names = ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc")
    deadline = time.monotonic() + timeout
    while True:
        got = {"health": httpx.get(f"{base}/health", timeout=10).status_code}
        text = httpx.get(f"{base}/metrics", timeout=10).text
        for n in names:  # summed over label sets; None when vLLM does not export it
            vals = [float(m) for m in re.findall(rf"^vllm:{n}(?:{{[^}}]*}})? (\S+)$", text, re.M)]
            got[n] = sum(vals) if vals else None
        got["idle"] = got["health"] == 200 and all(got[n] == 0 for n in names)
        if got["idle"] or time.monotonic() > deadline:
            return got
        time.sleep(0.5)
