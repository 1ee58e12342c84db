"""Per-request ULD arguments in one engine's batches, against plain vLLM and the reference;
the engine-wide mode switch through the worker extension (no pickled functions)."""

import pytest
import torch
from engine_helpers import ENGINE_KW, NEAR_TIE, PROMPTS, shutdown

from uld_vllm.core.reference import ReferenceDecoder

# starts vLLM engines, API servers or Ray (`make test-fast` leaves these out)
pytestmark = pytest.mark.engine

MAX_NEW = 14
# a request per prompt, cycling through the engine's default, alpha 0.5 and alpha 0; lengths
# differ so requests finish at different steps, and at most 4 run at once, so rows are
# removed, moved into the gaps and refilled while the others decode
ALPHAS = [None, 0.5, 0.0]
LENGTHS = [MAX_NEW, 5, 9, 12, 3, MAX_NEW, 7, 10, 4, 11]
KW = dict(ENGINE_KW, max_num_seqs=4)


def params(i, **kw):
    from vllm import SamplingParams

    alpha = ALPHAS[i % 3]
    return SamplingParams(max_tokens=LENGTHS[i], temperature=0.0, ignore_eos=True, logprobs=2,
                          extra_args=None if alpha is None else {"uld_alpha": alpha}, **kw)


@pytest.fixture(scope="module")
def uld(tiny_llama, llama_adapter):
    """One ULD engine (alpha 0.8, r 0.1); every output the tests read."""
    from vllm import SamplingParams
    from vllm.exceptions import VLLMValidationError

    import uld_vllm
    from uld_vllm.jobs.spec import set_uld_mode

    mp = pytest.MonkeyPatch()
    # the mode switch must work without vLLM's pickle-based IPC (engine_helpers enables it
    # for the inspect functions of other modules)
    mp.delenv("VLLM_ALLOW_INSECURE_SERIALIZATION", raising=False)
    llm = uld_vllm.LLM(str(tiny_llama), uld_adapter=str(llama_adapter), uld_alpha=0.8,
                       uld_filter_ratio=0.1, **KW)
    run = {}
    try:
        # the mixed batch, plus one prompt-log-probs request among them
        sps = [params(i) for i in range(len(PROMPTS))]
        plp = SamplingParams(max_tokens=1, prompt_logprobs=0)
        outs = llm.generate(PROMPTS + [PROMPTS[5]], sps + [plp], use_tqdm=False)
        run["mixed"], run["prompt_lp"] = outs[:-1], outs[-1]
        # the same prompts without per-request values: the engine's scalar path
        run["defaults"] = llm.generate(PROMPTS, SamplingParams(
            max_tokens=MAX_NEW, temperature=0.0, ignore_eos=True, logprobs=2), use_tqdm=False)
        run["rejected"] = []
        for xa in ({"uld_alpha": -1.0}, {"uld_alpah": 0.5}, {"uld_mode": "x"}):
            with pytest.raises(VLLMValidationError) as e:
                llm.generate(["Hello"], SamplingParams(max_tokens=2, extra_args=xa),
                             use_tqdm=False)
            run["rejected"].append(str(e.value))
        with pytest.raises(VLLMValidationError) as e:
            llm.generate(["Hello"], SamplingParams(max_tokens=1, prompt_logprobs=0,
                                                   extra_args={"uld_alpha": 0.0}),
                         use_tqdm=False)
        run["rejected_plp"] = str(e.value)
        # still serving, same answers as before the refusals
        again = llm.generate(PROMPTS[:3], [params(i) for i in range(3)], use_tqdm=False)
        run["again"] = [list(o.outputs[0].token_ids) for o in again]
        set_uld_mode(llm, "score")
        run["score_lp"] = llm.generate([PROMPTS[5]], plp, use_tqdm=False)[0]
        set_uld_mode(llm, "generate")
        run["generate_lp"] = llm.generate([PROMPTS[5]], plp, use_tqdm=False)[0]
        run["state"] = llm.collective_rpc("uld_combiner_state")[0]
    finally:
        shutdown(llm)
        mp.undo()
    return run


def _separate(make):
    from vllm import SamplingParams

    llm = make()
    try:
        sp = SamplingParams(max_tokens=MAX_NEW, temperature=0.0, ignore_eos=True, logprobs=2)
        return llm.generate(PROMPTS, sp, use_tqdm=False)
    finally:
        shutdown(llm)


@pytest.fixture(scope="module")
def plain(tiny_llama):
    from vllm import LLM

    return _separate(lambda: LLM(str(tiny_llama), **KW))


@pytest.fixture(scope="module")
def half(tiny_llama, llama_adapter):
    """A separate ULD engine whose own alpha is 0.5."""
    import uld_vllm

    return _separate(lambda: uld_vllm.LLM(str(tiny_llama), uld_adapter=str(llama_adapter),
                                          uld_alpha=0.5, uld_filter_ratio=0.1, **KW))


def assert_rows_equal(mixed, separate, rows):
    """Tokens and top-2 log-probs of ``rows`` equal the separate run's (its first tokens)."""
    for i in rows:
        got, want = mixed[i].outputs[0], separate[i].outputs[0]
        n = LENGTHS[i]
        assert list(got.token_ids) == list(want.token_ids)[:n], i
        for step in range(n):
            g, w = got.logprobs[step], want.logprobs[step]
            assert set(g) == set(w)
            for tok in g:
                assert g[tok].logprob == pytest.approx(w[tok].logprob, abs=1e-4)


def assert_prefixes_match(outs, ref, idx):
    """Each engine row equals the reference's first tokens, except after a near-tie."""
    prompts = [PROMPTS[i] for i in idx]
    want = ref.generate(prompts, max_new_tokens=MAX_NEW, ignore_eos=True)
    for i, w in zip(idx, want, strict=True):
        got = list(outs[i].outputs[0].token_ids)
        assert len(got) == LENGTHS[i]
        exp = w.token_ids[:LENGTHS[i]]
        if got == exp:
            continue
        j = next(k for k, (a, b) in enumerate(zip(got, exp)) if a != b)
        top2 = ref.next_token_scores(PROMPTS[i], exp[:j]).topk(2).values
        assert float(top2[0] - top2[1]) < NEAR_TIE, f"row {i} diverges at step {j}"


def test_alpha_zero_rows_are_plain_vllm_tokens_and_logprobs(uld, plain):
    assert_rows_equal(uld["mixed"], plain, range(2, len(PROMPTS), 3))


def test_half_alpha_rows_are_a_separate_alpha_half_engine(uld, half):
    assert_rows_equal(uld["mixed"], half, range(1, len(PROMPTS), 3))


def test_default_rows_are_the_engine_without_per_request_values(uld):
    assert_rows_equal(uld["mixed"], uld["defaults"], range(0, len(PROMPTS), 3))


def test_default_and_half_alpha_rows_equal_the_reference_at_their_alpha(uld, tiny_llama,
                                                                        llama_adapter):
    for alpha, start in ((0.8, 0), (0.5, 1)):
        ref = ReferenceDecoder.load(tiny_llama, llama_adapter, alpha=alpha, filter_ratio=0.1)
        assert_prefixes_match(uld["mixed"], ref, list(range(start, len(PROMPTS), 3)))


def test_rows_really_differ_by_alpha(uld, plain):
    # the three settings give different tokens on some prompts, so a swapped row would show
    differ = sum(list(uld["mixed"][i].outputs[0].token_ids) !=
                 list(plain[i].outputs[0].token_ids)[:LENGTHS[i]]
                 for i in range(0, len(PROMPTS), 3))
    assert differ >= 2
    assert uld["state"]["stats"]["per_request"] > 0 and uld["state"]["stats"]["target"] > 0


def test_bad_values_are_refused_naming_the_key_and_the_engine_keeps_serving(uld):
    assert "uld_alpha" in uld["rejected"][0] and ">= 0" in uld["rejected"][0]
    assert "'uld_alpah'" in uld["rejected"][1] and "uld_mode" in uld["rejected"][1]
    assert "uld_mode" in uld["rejected"][2] and "'score'" in uld["rejected"][2]
    assert "prompt_logprobs always use the engine's" in uld["rejected_plp"]
    assert uld["again"] == [list(o.outputs[0].token_ids)[:LENGTHS[i]]
                            for i, o in enumerate(uld["mixed"][:3])]


def _prompt_lps(out):
    ids = out.prompt_token_ids
    return ids, torch.tensor([out.prompt_logprobs[i][ids[i]].logprob
                              for i in range(1, len(ids))])


@pytest.mark.parametrize("key, mode", [("prompt_lp", "generate"), ("generate_lp", "generate"),
                                       ("score_lp", "score")])
def test_prompt_logprobs_use_the_engines_alpha_and_mode(uld, tiny_llama, llama_adapter,
                                                        key, mode):
    """In a batch whose other rows ask for alpha 0.5 and 0, and after the mode switches."""
    ids, got = _prompt_lps(uld[key])
    ref = ReferenceDecoder.load(tiny_llama, llama_adapter, alpha=0.8, filter_ratio=0.1)
    (want,) = ref.score([ids[:1]], [ids[1:]], mode=mode)
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    fin = torch.isfinite(want)
    assert int(fin.sum()) >= 5  # the rest are filtered-out tokens, -inf on both sides
    torch.testing.assert_close(got[fin], want[fin], atol=1e-4, rtol=1e-4)
    assert uld["state"]["mode"] == "generate"
