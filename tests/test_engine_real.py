"""The ULD engine on a real pretrained model (SmolLM2-135M-Instruct, fp32) with a *trained*
adapter: greedy tokens equal the reference decoder's at r = 0.01 and 0.1, prompt log-probs
equal its teacher-forced scores, and `uld-vllm serve` (model given by its short name) answers
/v1/chat/completions with the offline engine's text."""

import json

import httpx
import pytest
import torch
from engine_helpers import assert_greedy_matches, running_server, shutdown

from uld_vllm.core.prompts import PromptFormatter
from uld_vllm.core.reference import ReferenceDecoder

# starts vLLM engines, API servers or Ray (`make test-fast` leaves these out)
pytestmark = pytest.mark.engine

NAME = "smollm2-135m-instruct"
MAX_NEW = 12
QUESTIONS = ["Which school does Harry Potter attend?", "What is the capital of France?",
             "Who wrote the novel War and Peace?", "Name a planet with rings."]
ENGINE = dict(dtype="float32", max_model_len=512, enforce_eager=True, seed=0)


@pytest.fixture(scope="module")
def adapter(smollm2, tmp_path_factory):
    """K = 8 LoRA trained for a few steps (lr 1e-2) on Harry Potter QA vs general QA."""
    from uld_vllm.train import make_config, run_training

    root = tmp_path_factory.mktemp("real_adapter")
    forget = [{"question": q, "answer": a} for q, a in [
        ("Which school does Harry Potter attend?", "Harry Potter attends Hogwarts."),
        ("Who wrote the Harry Potter books?", "J.K. Rowling wrote them."),
        ("What is Harry Potter's owl called?", "His owl is Hedwig."),
        ("Who is Harry Potter's best friend?", "Ron Weasley.")]]
    retain = [{"question": q, "answer": a} for q, a in [
        ("What is the capital of Italy?", "Rome."), ("What is 2 + 2?", "4."),
        ("Who painted the Mona Lisa?", "Leonardo da Vinci."),
        ("What is the largest ocean?", "The Pacific Ocean.")]]
    for name, rows in (("forget", forget), ("retain", retain)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    torch.manual_seed(0)
    cfg = make_config(model=NAME, forget=str(root / "forget.jsonl"),
                      retain=str(root / "retain.jsonl"), output_dir=str(root / "adapter"),
                      num_layers=8, num_train_epochs=3, learning_rate=1e-2,
                      per_device_train_batch_size=8, gradient_accumulation_steps=1,
                      max_length=64, alpha=0.8, filter_ratio=0.01, disable_tqdm=True,
                      stop_at_targets=False, seed=0)
    ad = run_training(cfg, log=lambda m: None)
    assert ad.config.training["optimizer_steps"] == 3
    return ad.path


@pytest.fixture(scope="module")
def prompts(smollm2):
    from transformers import AutoTokenizer

    fmt = PromptFormatter(AutoTokenizer.from_pretrained(smollm2))
    return fmt, [fmt.encode_prompt(q) for q in QUESTIONS]


def _greedy(llm, prompts):
    from vllm import SamplingParams

    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(max_tokens=MAX_NEW, temperature=0.0, ignore_eos=True),
                        use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs], [o.outputs[0].text for o in outs]


@pytest.fixture(scope="module")
def refs(smollm2, adapter):
    """The reference decoder at each filter ratio, loaded once for every test that asks it."""
    return {r: ReferenceDecoder.load(NAME, adapter, filter_ratio=r) for r in (0.01, 0.1)}


@pytest.fixture(scope="module")
def run(adapter, prompts):
    """Both filter ratios on one engine each; score-mode prompt log-probs on the r = 0.01 one."""
    import uld_vllm
    from uld_vllm.engine.inspect import combiner_stats
    from uld_vllm.jobs.spec import set_uld_mode

    fmt, ids = prompts
    out = {}
    llm = uld_vllm.LLM(NAME, uld_adapter=str(adapter), uld_filter_ratio=0.01, **ENGINE)
    try:
        out[0.01] = _greedy(llm, ids)
        out["stats"] = llm.apply_model(combiner_stats)[0]
        answers = [fmt.encode_answer(a, q) for q, a in
                   [(QUESTIONS[0], "Harry Potter attends Hogwarts."),
                    (QUESTIONS[1], "The capital of France is Paris.")]]
        out["answers"] = answers
        out[("generate", 0.01)] = _answer_logprobs(llm, ids, answers)
        set_uld_mode(llm, "score")
        out["scored"] = [(len(p), a, got) for p, a, got in
                         zip(ids[:2], answers, _answer_logprobs(llm, ids, answers))]
        set_uld_mode(llm, "generate")
        assert _greedy(llm, ids) == out[0.01]  # back in generate mode, same answers
    finally:
        shutdown(llm)
    llm = uld_vllm.LLM(NAME, uld_adapter=str(adapter), uld_filter_ratio=0.1, **ENGINE)
    try:
        out[0.1] = _greedy(llm, ids)
        out[("generate", 0.1)] = _answer_logprobs(llm, ids, answers)
    finally:
        shutdown(llm)
    return out


def _answer_logprobs(llm, prompts, answers):
    """Teacher-forced log-prob of each answer token, as the engine reports prompt log-probs."""
    from vllm import SamplingParams

    pl = llm.generate([{"prompt_token_ids": p + a} for p, a in zip(prompts, answers)],
                      SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)
    return [[o.prompt_logprobs[len(p) + j][t].logprob for j, t in enumerate(a)]
            for p, a, o in zip(prompts, answers, pl)]


@pytest.mark.parametrize("ratio", [0.01, 0.1])
def test_greedy_equals_reference_with_a_trained_adapter(refs, prompts, run, ratio):
    ref = refs[ratio]
    assert ref.alpha == 0.8
    ties = assert_greedy_matches(run[ratio][0], ref, prompts[1], MAX_NEW)
    assert ties <= 1


@pytest.mark.parametrize("ratio", [0.01, 0.1])
def test_each_ratio_reaches_the_engine(refs, prompts, run, ratio):
    # r changes the kept set (>= 491 vs >= 4915 tokens), so the distribution generate mode
    # samples from: each engine's must be the reference's at its own ratio, and the two differ.
    # (Greedy tokens rarely tell them apart: the default gate gives a barely trained assistant
    # no weight, and the argmax is kept at any ratio.)
    ref = refs[ratio]
    other = run[("generate", 0.1 if ratio == 0.01 else 0.01)]
    differs = 0
    for got, answer, prompt, alt in zip(run[("generate", ratio)], run["answers"], prompts[1],
                                        other):
        want = ref.score([prompt], [answer], mode="generate")[0]
        torch.testing.assert_close(torch.tensor(got), want.float(), atol=2e-3, rtol=1e-4)
        differs += not torch.allclose(torch.tensor(got), torch.tensor(alt), atol=2e-3)
    assert differs


def test_prompt_logprobs_equal_reference_scores(refs, prompts, run):
    ref = refs[0.01]
    for (_, answer, got), prompt in zip(run["scored"], prompts[1]):
        want = ref.score([prompt], [answer], mode="score")[0]
        torch.testing.assert_close(torch.tensor(got), want.float(), atol=2e-3, rtol=1e-4)


def test_serve_chat_answers_like_the_offline_engine(adapter, run, tmp_path):
    with running_server(NAME, "--uld-adapter", str(adapter), "--dtype", "float32",
                        "--max-model-len", "512", "--enforce-eager",
                        log=tmp_path / "server.log") as base:
        models = httpx.get(f"{base}/v1/models", timeout=30).json()
        assert [m["id"] for m in models["data"]] == [NAME]  # the short name is served
        for i, q in enumerate(QUESTIONS[:2]):
            r = httpx.post(f"{base}/v1/chat/completions", timeout=120, json={
                "model": NAME, "messages": [{"role": "user", "content": q}],
                "max_tokens": MAX_NEW, "temperature": 0, "ignore_eos": True})
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["message"]["content"] == run[0.01][1][i]
