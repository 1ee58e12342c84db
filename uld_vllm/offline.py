"""Offline engine work shared by `uld-vllm generate` and `uld-vllm eval`: build an engine from a
picklable spec, stream generations as requests finish, score answers teacher-forced.

Work is a list of *items* ``{"key": int, "prompt_token_ids": [...]}`` (scoring items also carry
``"start"``: the index of the first scored token). Results come back as requests finish, not
in input order, so callers can write each one as soon as it exists; the same item lists run
unchanged on N Ray replicas (`uld_vllm.replicas`).
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections.abc import Iterable, Iterator

from uld_vllm.errors import UldError

GENERATE, SCORE = "generate", "score"


@dataclasses.dataclass
class EngineSpec:
    """Everything needed to build the same engine in this process or in a Ray replica."""

    model: str
    uld_adapter: str | None = None
    uld_alpha: float | None = None
    uld_filter_ratio: float | None = None
    vllm_kwargs: dict = dataclasses.field(default_factory=dict)

    def build(self):
        from uld_vllm.llm import LLM

        return LLM(self.model, uld_adapter=self.uld_adapter, uld_alpha=self.uld_alpha,
                   uld_filter_ratio=self.uld_filter_ratio, **self.vllm_kwargs)


def add_model_args(parser, adapter_help: str) -> None:
    """The target and its optional ULD adapter (generate, eval)."""
    parser.add_argument("--model", required=True,
                        help="target model: hub id, folder, or a short name of "
                             "`uld-vllm fetch-model` (e.g. smollm2-135m-instruct)")
    parser.add_argument("--uld-adapter", default=None, help=adapter_help)
    parser.add_argument("--uld-alpha", type=float, default=None,
                        help="default: the adapter's uld_config.json")
    parser.add_argument("--uld-filter-ratio", type=float, default=None,
                        help="default: the adapter's uld_config.json")


def add_engine_args(parser) -> None:
    """The vLLM EngineArgs that offline jobs expose, plus ``--replicas``."""
    e = parser.add_argument_group("engine (vLLM EngineArgs)")
    e.add_argument("--dtype", default="auto")
    e.add_argument("--max-model-len", type=int, default=None)
    e.add_argument("--tensor-parallel-size", type=int, default=1)
    e.add_argument("--max-num-seqs", type=int, default=None)
    e.add_argument("--enforce-eager", action="store_true")
    e.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction,
                   default=None)
    e.add_argument("--gpu-memory-utilization", type=float, default=None)
    e.add_argument("--trust-remote-code", action="store_true")
    e.add_argument("--revision", default=None)
    e.add_argument("--replicas", type=int, default=1,
                   help="data-parallel engine replicas through Ray Data (each with "
                        "--tensor-parallel-size devices); needs `pip install uld-vllm[ray]`")


def engine_spec(a) -> EngineSpec:
    if a.replicas < 1:
        raise UldError(f"--replicas must be at least 1, got {a.replicas}", "pass --replicas N")
    kw = {"dtype": a.dtype, "tensor_parallel_size": a.tensor_parallel_size,
          "enforce_eager": a.enforce_eager, "trust_remote_code": a.trust_remote_code}
    for name in ("max_model_len", "max_num_seqs", "gpu_memory_utilization", "revision",
                 "enable_prefix_caching"):
        if getattr(a, name) is not None:
            kw[name] = getattr(a, name)
    from uld_vllm.models import resolve_model

    a.model = resolve_model(a.model)  # callers tokenise with the same folder
    return EngineSpec(a.model, a.uld_adapter, a.uld_alpha, a.uld_filter_ratio, kw)


def set_uld_mode(llm, mode: str) -> None:
    """Switch a running ULD engine between generation and scoring semantics (no-op if plain).

    Called between jobs, with no request in flight. The KV cache does not depend on the mode
    (only the final combination does), so cached prefixes stay valid across the switch. The
    worker method is called by name (``uld_vllm.engine.worker``): nothing pickled travels."""
    from uld_vllm.engine.settings import WORKER_EXTENSION

    config = llm.llm_engine.vllm_config
    if "uld" not in (config.additional_config or {}):
        return
    if config.parallel_config.worker_extension_cls != WORKER_EXTENSION:
        raise UldError(f"this ULD engine's workers have worker_extension_cls="
                       f"{config.parallel_config.worker_extension_cls!r}, which cannot switch "
                       "the ULD mode", f"build it without worker_extension_cls (uld_vllm.LLM "
                       f"sets {WORKER_EXTENSION!r}) or subclass that class")
    got = llm.collective_rpc("uld_set_mode", args=(mode,))
    if any(g != mode for g in got):
        raise RuntimeError(f"uld_set_mode({mode!r}) answered {got} on the workers")


class Progress:
    """A rows bar with tokens/s: generated tokens when generating, scored ones when scoring."""

    def __init__(self, total: int, desc: str, enabled: bool = True, done: int = 0):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, initial=done, desc=desc, unit="row", disable=not enabled,
                        dynamic_ncols=True)
        self.tokens, self.t0 = 0, time.perf_counter()

    def update(self, rows: int, tokens: int) -> None:
        self.tokens += tokens
        rate = self.tokens / max(time.perf_counter() - self.t0, 1e-9)
        self.bar.set_postfix_str(f"{rate:,.0f} tok/s", refresh=False)
        self.bar.update(rows)

    def close(self) -> None:
        self.bar.close()


def sampling_params(kind: str, sampling: dict | None):
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    if kind == SCORE:  # one throw-away token; the answer's log-probs come with the prompt
        return SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0,
                              detokenize=False, output_kind=RequestOutputKind.FINAL_ONLY)
    return SamplingParams(**(sampling or {}), output_kind=RequestOutputKind.FINAL_ONLY)


def result_of(kind: str, key: int, out, start: int = 0) -> dict:
    """A finished vLLM RequestOutput as a plain dict (what travels back from replicas)."""
    if kind == SCORE:
        ids, lps = out.prompt_token_ids, out.prompt_logprobs
        vals = [lps[i][ids[i]].logprob for i in range(max(start, 1), len(ids))]
        return {"key": key, "logprob_sum": float(sum(vals)), "num_tokens": len(vals)}
    comps = out.outputs
    return {"key": key, "prompt_tokens": len(out.prompt_token_ids or []),
            "texts": [c.text for c in comps],
            "completion_tokens": [len(c.token_ids) for c in comps],
            "finish_reasons": [c.finish_reason for c in comps]}


def result_tokens(kind: str, res: dict) -> int:
    return res["num_tokens"] if kind == SCORE else sum(res["completion_tokens"])


def stream(llm, kind: str, items: Iterable[dict], sampling: dict | None = None,
           progress: Progress | None = None, window: int | None = None) -> Iterator[dict]:
    """Run ``items`` through ``llm``'s engine with continuous batching; yield results as the
    requests finish. At most ``window`` requests wait in the engine at once, so a huge input
    does not all sit in the scheduler (and an interrupted run has little in flight)."""
    from vllm.inputs import TokensPrompt

    engine = llm.llm_engine
    params = sampling_params(kind, sampling)
    max_seqs = llm.llm_engine.vllm_config.scheduler_config.max_num_seqs
    window = window or max(64, 4 * max_seqs)
    todo, pending = iter(items), {}
    exhausted = False
    try:
        while True:
            while not exhausted and len(pending) < window:
                item = next(todo, None)
                if item is None:
                    exhausted = True
                    break
                key = str(item["key"])
                if key in pending:
                    raise UldError(f"work item key {key} appears twice", "keys must be unique")
                try:
                    engine.add_request(
                        key, TokensPrompt(prompt_token_ids=item["prompt_token_ids"]), params)
                except ValueError as exc:  # e.g. longer than the model's context
                    msg = " ".join(str(exc).split())[:300]
                    raise UldError(f"vLLM rejected request {key} ({msg})",
                                   "shorten it or raise --max-model-len") from None
                pending[key] = item
            if not pending:
                return
            for out in engine.step():
                if not out.finished:
                    continue
                item = pending.pop(out.request_id)
                res = result_of(kind, item["key"], out, item.get("start", 0))
                if progress is not None:
                    progress.update(1, result_tokens(kind, res))
                yield res
    finally:
        if pending:  # interrupted: leave the engine clean for the caller's next job
            engine.abort_request(list(pending))


@dataclasses.dataclass
class Job:
    """One kind of work on the engine: ``mode`` switches a ULD engine's semantics first."""

    kind: str
    items: list[dict]
    sampling: dict | None = None
    mode: str | None = None


def run_jobs(engine, jobs: list[Job], *, replicas: int = 1,
             progress: Progress | None = None) -> Iterator[tuple[int, dict]]:
    """``(job index, result)`` as requests finish: the jobs one after the other on one built
    engine, or all of them on ``replicas`` Ray replicas built once from an ``EngineSpec``."""
    if replicas > 1:
        from uld_vllm.replicas import run_replicated

        if not isinstance(engine, EngineSpec):
            raise TypeError("replicas > 1 needs an EngineSpec, not a built engine")
        yield from run_replicated(engine, jobs, replicas, progress)
        return
    for j, job in enumerate(jobs):
        if job.mode is not None:
            set_uld_mode(engine, job.mode)
        for res in stream(engine, job.kind, job.items, job.sampling, progress):
            yield j, res


def shutdown(llm) -> None:
    """Stop vLLM's engine process now (its own cleanup waits for garbage collection)."""
    core = getattr(llm.llm_engine, "engine_core", None)
    if core is not None and hasattr(core, "shutdown"):
        core.shutdown()
