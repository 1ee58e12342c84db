"""The engine an offline job runs on: its flags, a picklable spec, the environment it starts
with, the ULD mode switch, shutdown.

``EngineSpec`` builds the same engine in this process or in a Ray replica
(``uld_vllm.jobs.replicas``); ``generate`` and ``eval`` share these flags.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import sys

from uld_vllm.errors import UldError


@dataclasses.dataclass
class EngineSpec:
    """Everything needed to build the same engine in this process or in a Ray replica."""

    model: str
    uld_adapter: str | None = None
    uld_alpha: float | None = None
    uld_filter_ratio: float | None = None
    vllm_kwargs: dict = dataclasses.field(default_factory=dict)
    # the decoding rule's settings given (``penalty``/``gate``; engine.settings.rule_settings)
    uld_rule: dict = dataclasses.field(default_factory=dict)

    def build(self):
        from uld_vllm.engine.llm import LLM

        rule = dict(self.uld_rule)
        llm = LLM(self.model, uld_adapter=self.uld_adapter, uld_alpha=self.uld_alpha,
                  uld_filter_ratio=self.uld_filter_ratio, uld_penalty=rule.get("penalty"),
                  uld_gate=(rule["gate"] or "off") if "gate" in rule else None,
                  **self.vllm_kwargs)
        warn_if_slow_dtype(llm)
        return llm


def warn_if_slow_dtype(llm, cpuinfo: str | None = None) -> str | None:
    """Say on stderr when the engine's resolved dtype is one this CPU runs slowly."""
    from uld_vllm.core.hardware import slow_engine_dtype

    config = llm.llm_engine.vllm_config
    line = slow_engine_dtype(config.model_config.dtype, config.device_config.device_type,
                             cpuinfo)
    if line:
        print(line, file=sys.stderr, flush=True)
    return line


def add_model_args(parser, adapter_help: str, *, required: bool = True,
                   model_help: str = "target model: hub id, folder, or a short name of "
                                     "`uld-vllm fetch-model` (e.g. smollm2-135m-instruct)"
                   ) -> None:
    """The target and its optional ULD adapter (generate, eval, bench)."""
    from uld_vllm.engine.cli_args import add_uld_args

    parser.add_argument("--model", required=required, default=None, help=model_help)
    add_uld_args(parser, mode=False, adapter_help=adapter_help)


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
    from uld_vllm.core.models import resolve_model

    a.model = resolve_model(a.model)  # callers tokenise with the same folder
    from uld_vllm.engine.cli_args import rule_of_args

    return EngineSpec(a.model, a.uld_adapter, a.uld_alpha, a.uld_filter_ratio, kw,
                      rule_of_args(a))


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


@contextlib.contextmanager
def environment(env: dict[str, str]):
    """``env`` in ``os.environ`` inside the block; afterwards, also after an error, every name
    has its previous value again, or is unset again. vLLM's engine processes copy the
    environment when they start, so settings given this way reach only the engine started in
    the block."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, old in saved.items():
            if old is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = old


@contextlib.contextmanager
def engine_on_every_core(log):
    """Bind the worker of a CPU engine started in the block to every allowed core; restored
    afterwards.

    vLLM's default binding keeps cores for its front end, which costs little on a many-core
    machine but half the machine on a 2-core one (the worker got one core). A batch job's front
    end mostly waits, so its worker gets them all: same outputs, shorter run. Nothing changes on
    a GPU, on one core, or when the user set ``VLLM_CPU_OMP_THREADS_BIND``."""
    import torch

    from uld_vllm.core.hardware import every_core_worker_env

    env = every_core_worker_env()
    bind = env["VLLM_CPU_OMP_THREADS_BIND"]
    if torch.cuda.is_available() or "VLLM_CPU_OMP_THREADS_BIND" in os.environ \
            or "," not in bind:
        yield
        return
    log(f"engine bound to cores {bind} (set VLLM_CPU_OMP_THREADS_BIND to choose)")
    with environment(env):
        yield


def shutdown(llm) -> None:
    """Stop vLLM's engine process now (its own cleanup waits for garbage collection)."""
    core = getattr(llm.llm_engine, "engine_core", None)
    if core is not None and hasattr(core, "shutdown"):
        core.shutdown()
