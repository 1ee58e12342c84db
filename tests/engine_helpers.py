"""Shared pieces of the vLLM engine tests (not a test module)."""

from __future__ import annotations

import contextlib
import gc
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from uld_vllm.dev.toy_data import MIXED_PROMPTS

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
# lets llm.apply_model / collective_rpc ship uld_vllm.engine.inspect functions to the worker
os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")

PROMPTS = MIXED_PROMPTS
ENGINE_KW = dict(dtype="float32", max_model_len=512, enforce_eager=True, seed=0)
# block_size 32 (CPU default 128) so the ~40-token shared prefixes fill cacheable blocks
CHUNKED_KW = dict(enable_prefix_caching=True, enable_chunked_prefill=True,
                  max_num_batched_tokens=16, max_num_seqs=16, block_size=32)
NEAR_TIE = 1e-4


def shutdown(llm) -> None:
    """Stop the engine processes now (not at interpreter exit), freeing cores and KV memory."""
    llm.llm_engine.engine_core.shutdown()
    gc.collect()


def assert_greedy_matches(engine_tokens, ref, prompts, max_new_tokens) -> int:
    """Token-identical greedy outputs, except after a near-tie that the reference shows.

    Returns the number of near-tie divergences (each asserted: top-2 margin < 1e-4 in the
    reference at the first differing step), so callers can also bound it.
    """
    want = ref.generate(prompts, max_new_tokens=max_new_tokens, ignore_eos=True)
    ties = 0
    for p, got, w in zip(prompts, engine_tokens, want, strict=True):
        got = list(got)
        assert len(got) == max_new_tokens
        if got == w.token_ids:
            continue
        j = next(i for i, (a, b) in enumerate(zip(got, w.token_ids)) if a != b)
        scores = ref.next_token_scores(p, w.token_ids[:j])
        top2 = scores.topk(2).values
        margin = float(top2[0] - top2[1])
        assert margin < NEAR_TIE, (
            f"prompt {p[:40]!r}: engine diverges at step {j} ({got[j]} vs {w.token_ids[j]}) "
            f"with a clear reference margin {margin:.3g}")
        ties += 1
    return ties


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# a chat template for the tiny test models (they ship none)
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "assistant:")


def chat_template_file(tmp_path_factory) -> Path:
    tpl = tmp_path_factory.mktemp("tpl") / "chat.jinja"
    tpl.write_text(CHAT_TEMPLATE)
    return tpl


def sse_chunks(base: str, path: str, body: dict, timeout: float = 120) -> list[dict]:
    """The parsed ``data:`` events of a streamed (``"stream": true``) request."""
    import json

    import httpx

    out = []
    with httpx.stream("POST", f"{base}{path}", json=body, timeout=timeout) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                out.append(json.loads(line[6:]))
    return out


def serve_cmd(*args):
    return [sys.executable, "-m", "uld_vllm.cli", "serve", *args]


@contextlib.contextmanager
def running_server(*args, log: Path, timeout: float = 300):
    """``uld-vllm serve ARGS`` on a free local port until /health answers; yields its base URL
    and stops it afterwards. Its output goes to ``log`` (quoted when it fails to start)."""
    import httpx
    import pytest

    port = free_port()
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1")
    with open(log, "w") as f:
        proc = subprocess.Popen(serve_cmd(*args, "--host", "127.0.0.1", "--port", str(port)),
                                stdout=f, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + timeout
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"server exited early:\n{log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                pytest.fail(f"server did not come up:\n{log.read_text()[-3000:]}")
            time.sleep(1)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
