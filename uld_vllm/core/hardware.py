"""What the machine runs fast: native bf16 on this CPU, and a warning for an engine dtype it
would run slowly. Pure Python: no torch, no vLLM."""

from __future__ import annotations

import os
from pathlib import Path


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool:
    """avx512_bf16 or AMX: bf16 matmuls run natively (faster than fp32 on such a CPU);
    without them torch emulates bf16 and autocast is several times slower."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    flags = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[-1].split())
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def slow_engine_dtype(dtype: object, device_type: str, cpuinfo: str | None = None) -> str | None:
    """One line to print when a CPU engine runs bf16 without native bf16, else None.

    vLLM's ``--dtype auto`` takes the model's dtype, and many checkpoints (SmolLM2 among them)
    say bfloat16: on an AVX2-only CPU an eval then runs many times slower than in float32,
    with nothing on screen to say why."""
    name = str(dtype).removeprefix("torch.")
    if device_type != "cpu" or name != "bfloat16" or cpu_has_native_bf16(cpuinfo):
        return None
    return ("uld-vllm: WARNING: the engine runs bfloat16 on a CPU without native bf16 "
            "(avx512_bf16/AMX), many times slower than float32: pass --dtype float32")


def every_core_worker_env() -> dict[str, str]:
    """vLLM CPU worker settings that give its worker every core this process may use (vLLM's
    default keeps cores for the front end: on 2 cores the worker gets one)."""
    return {"VLLM_CPU_OMP_THREADS_BIND": ",".join(map(str, sorted(os.sched_getaffinity(0)))),
            "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}
