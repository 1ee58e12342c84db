"""`uld-vllm serve` / `vllm serve ... --uld-adapter` end to end on 127.0.0.1."""

import os
import subprocess

import httpx
import pytest
from engine_helpers import chat_template_file, free_port, running_server, serve_cmd, sse_chunks

from uld_vllm.core.reference import ReferenceDecoder

# starts vLLM engines, API servers or Ray (`make test-fast` leaves these out)
pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def server(tiny_llama, llama_adapter, tmp_path_factory):
    tpl = chat_template_file(tmp_path_factory)
    log = tmp_path_factory.mktemp("log") / "server.log"
    # clients get full control here (per-request alpha 0, the soak's mixed alphas); the
    # default policy is tests/test_server_policy.py's
    with running_server(str(tiny_llama), "--uld-adapter", str(llama_adapter), "--uld-alpha",
                        "0.8", "--uld-filter-ratio", "0.1", "--uld-request-policy", "any",
                        "--dtype", "float32",
                        "--max-model-len", "512", "--enforce-eager", "--chat-template", str(tpl),
                        "--served-model-name", "tiny-uld", log=log) as base:
        yield base


def post(base, path, body, timeout=120):
    return httpx.post(f"{base}{path}", json=body, timeout=timeout)


def test_completions_greedy_matches_reference(server, tiny_llama, llama_adapter):
    prompt = "Question: What did the river do? Answer:"
    r = post(server, "/v1/completions", {"model": "tiny-uld", "prompt": prompt,
                                          "max_tokens": 12, "temperature": 0,
                                          "ignore_eos": True})
    assert r.status_code == 200, r.text
    text = r.json()["choices"][0]["text"]
    ref = ReferenceDecoder.load(tiny_llama, llama_adapter, alpha=0.8, filter_ratio=0.1)
    assert text == ref.generate([prompt], max_new_tokens=12, ignore_eos=True)[0].text
    chunks = sse_chunks(server, "/v1/completions", {
        "model": "tiny-uld", "prompt": prompt, "max_tokens": 12, "temperature": 0,
        "ignore_eos": True, "stream": True})
    assert len(chunks) > 1
    assert "".join(c["choices"][0]["text"] for c in chunks) == text


def test_chat_completions_streaming_and_not(server):
    body = {"model": "tiny-uld", "messages": [{"role": "user", "content": "Who wrote it?"}],
            "max_tokens": 8, "temperature": 0}
    r = post(server, "/v1/chat/completions", body)
    assert r.status_code == 200, r.text
    text = r.json()["choices"][0]["message"]["content"]
    chunks = sse_chunks(server, "/v1/chat/completions", {**body, "stream": True})
    streamed = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert streamed == text


def test_n_samples_with_a_seed_are_reproducible(server):
    body = {"model": "tiny-uld", "prompt": "The author wrote", "max_tokens": 10, "n": 3,
            "temperature": 1.0, "seed": 11, "ignore_eos": True}
    a = [c["text"] for c in post(server, "/v1/completions", body).json()["choices"]]
    b = [c["text"] for c in post(server, "/v1/completions", body).json()["choices"]]
    c = [c["text"] for c in post(server, "/v1/completions", {**body, "seed": 12}).json()
         ["choices"]]
    assert len(a) == 3 and a == b and a != c


def test_malformed_request_gets_4xx_and_the_server_keeps_serving(server):
    bad = post(server, "/v1/completions", {"model": "tiny-uld", "prompt": "x",
                                           "max_tokens": -3})
    assert 400 <= bad.status_code < 500
    garbage = httpx.post(f"{server}/v1/completions", content=b"{not json",
                         headers={"content-type": "application/json"}, timeout=30)
    assert 400 <= garbage.status_code < 500
    ok = post(server, "/v1/completions", {"model": "tiny-uld", "prompt": "Hello",
                                          "max_tokens": 4})
    assert ok.status_code == 200


@pytest.mark.parametrize("case", ["missing", "other-base", "filter-ratio", "unexpected-module"])
def test_bad_adapter_stops_the_server_with_one_line(case, tiny_llama, tiny_qwen2,
                                                    llama_adapter, tmp_path):
    model, adapter, extra = str(tiny_llama), str(llama_adapter), []
    if case == "missing":
        adapter = str(tmp_path / "nope")
    elif case == "other-base":
        model = str(tiny_qwen2)
    elif case == "filter-ratio":
        extra = ["--uld-filter-ratio", "1.5"]
    else:
        import shutil

        import torch
        from safetensors.torch import load_file, save_file

        adapter = tmp_path / "adapter"
        shutil.copytree(llama_adapter, adapter)
        w = adapter / "adapter_model.safetensors"
        tensors = load_file(w)
        tensors["base_model.model.lm_head.lora_A.weight"] = torch.zeros(16, 128)
        save_file(tensors, w)
    r = subprocess.run(serve_cmd(model, "--uld-adapter", adapter, "--port", str(free_port()),
                                 *extra),
                       capture_output=True, text=True, timeout=240,
                       env=dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1"))
    assert r.returncode != 0
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("uld-vllm: error:")]
    assert len(lines) == 1, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    want = {"missing": "does not exist", "other-base": "was trained for base model",
            "filter-ratio": "out of range", "unexpected-module": "unexpected module"}[case]
    assert want in lines[0]


def test_per_request_alpha_zero_over_http_is_the_target(server, tiny_llama):
    """vllm_xargs (the openai SDK's extra_body) carries uld_alpha; 0 serves the target."""
    prompt = "Question: What did the river do? Answer:"
    body = {"model": "tiny-uld", "prompt": prompt, "max_tokens": 12, "temperature": 0,
            "ignore_eos": True}
    r0 = post(server, "/v1/completions", {**body, "vllm_xargs": {"uld_alpha": 0}})
    assert r0.status_code == 200, r0.text
    plain = ReferenceDecoder.load(tiny_llama)
    want = plain.generate([prompt], max_new_tokens=12, ignore_eos=True)[0].text
    assert r0.json()["choices"][0]["text"] == want
    uld = post(server, "/v1/completions", body).json()["choices"][0]["text"]
    assert uld != want  # the default request still gets the ULD distribution


@pytest.mark.parametrize("xargs, words", [
    ({"uld_alpha": -1}, ["uld_alpha", ">= 0"]),
    ({"uld_alpha": "0.5"}, ["uld_alpha", "JSON number"]),
    ({"uld_beta": 1}, ["'uld_beta'", "uld_alpha", "uld_mode"]),
    ({"uld_mode": "sample"}, ["uld_mode", "'generate'"]),
])
def test_bad_per_request_values_are_a_400_naming_the_key(server, xargs, words):
    # streaming too: the refusal must come before the 200 of an event stream
    for path, extra in (("/v1/completions", {"prompt": "Hello"}),
                        ("/v1/completions", {"prompt": "Hello", "stream": True}),
                        ("/v1/chat/completions",
                         {"messages": [{"role": "user", "content": "Hello"}],
                          "stream": True})):
        r = post(server, path, {"model": "tiny-uld", "max_tokens": 4, "vllm_xargs": xargs,
                                **extra})
        assert r.status_code == 400, r.text
        msg = r.json()["error"]["message"]
        for w in words:
            assert w in msg, msg
    ok = post(server, "/v1/completions", {"model": "tiny-uld", "prompt": "Hello",
                                          "max_tokens": 4})
    assert ok.status_code == 200

