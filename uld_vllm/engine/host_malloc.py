"""The host allocator of a CPU ULD engine: keep a step's large buffers in glibc's heap.

For its first K layers a ULD step stacks the target's and the assistant's rows for the base
GEMMs, so a prefill of T tokens writes one ``[2T, 2I]`` gate/up output per assistant layer:
39 MB at T = 3200 on SmolLM2 in bf16, twice what plain vLLM allocates there. glibc maps
anything above its mmap threshold (dynamic, at most 32 MiB) fresh and unmaps it on free, and
hands freed heap above its trim threshold back to the kernel; either way the buffer is faulted
in page by page, zeroed by the kernel, in every layer of every prefill step. Measured on
SmolLM2 (K = 8, bf16, a prefill of 64 prompts x 50 tokens, one core): 4-128 k minor faults a
step with glibc's defaults, 4 with both thresholds raised; two ULD engines taking turns
(``uld-vllm bench ab``, two engine pairs) ran the step 6 % faster with them raised. Plain
vLLM's buffers there stay under 32 MiB: raising them gained it nothing.

So the ULD model raises both thresholds in its worker process when it is built on CPU: the
mmap threshold above the largest stacked buffer a step can allocate, the trim threshold to 8x
that. A buffer freed in one layer is then reused by the next. The trim threshold has to cover
what a whole step frees: the same prefill still faulted 26-35 k pages a step with 2x (98
MiB of freed heap kept), 4 with 256 MiB or 1 GiB. The heap keeps memory a step has already
used, so the worker no longer shrinks between steps; the engine's peak RSS grew by 95-390
MiB (2-9 %) in the benchmarks.

vLLM's CPU documentation recommends tcmalloc (``LD_PRELOAD``) for the same reason: with an
allocator preloaded, or on a C library other than glibc, nothing is changed.
``ULD_HOST_MALLOC=default`` keeps glibc's settings (read where the engine's model is built).
"""

from __future__ import annotations

import ctypes
import dataclasses
import os
import resource
import sys

from uld_vllm.errors import UldError

# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
# the most glibc's dynamic mmap threshold rises to on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX)
GLIBC_MMAP_THRESHOLD_MAX = 32 << 20
# the freed heap kept, in units of the mmap threshold (the module's docstring says why 8)
TRIM_FACTOR = 8
# mallopt takes an int
INT_MAX = 2**31 - 1
PRELOADED_ALLOCATORS = ("tcmalloc", "jemalloc", "mimalloc")
CHOICES = ("keep", "default")
_MIB = 1 << 20
_PAGE = 4096


def largest_step_buffer(max_num_batched_tokens: int, intermediate_size: int,
                        itemsize: int) -> int:
    """Bytes of the stacked gate/up output at the most tokens a step may hold: ``2T`` rows
    (target and assistant) of ``2I`` columns (gate and up)."""
    return 2 * max_num_batched_tokens * 2 * intermediate_size * itemsize


@dataclasses.dataclass(frozen=True)
class HostMallocPlan:
    apply: bool
    reason: str
    mmap_threshold: int = 0
    trim_threshold: int = 0


def check_choice(environ=None) -> str:
    """``ULD_HOST_MALLOC``: ``keep`` (unset) or ``default``; anything else is refused."""
    environ = os.environ if environ is None else environ
    choice = environ.get("ULD_HOST_MALLOC", "keep") or "keep"
    if choice not in CHOICES:
        raise UldError(f"ULD_HOST_MALLOC={choice!r} is unknown",
                       "unset it to raise glibc's thresholds, or set it to default to keep "
                       "glibc's settings")
    return choice


def plan(buffer_bytes: int, environ=None, libc_is_glibc: bool | None = None) -> HostMallocPlan:
    """What to set for a step whose largest buffer is ``buffer_bytes``; changes nothing."""
    environ = os.environ if environ is None else environ
    if check_choice(environ) == "default":
        return HostMallocPlan(False, "ULD_HOST_MALLOC=default: glibc's own settings")
    preload = environ.get("LD_PRELOAD", "")
    named = [a for a in PRELOADED_ALLOCATORS if a in preload]
    if named:
        return HostMallocPlan(False, f"{named[0]} is preloaded (LD_PRELOAD): its settings")
    if libc_is_glibc is None:
        libc_is_glibc = _glibc() is not None
    if not libc_is_glibc:
        return HostMallocPlan(False, "not glibc: the C library's own settings")
    # whole MiB, and a page above the largest buffer: glibc maps a request whose chunk (its
    # header and the allocator's alignment included) reaches the threshold
    mmap_threshold = max(GLIBC_MMAP_THRESHOLD_MAX, ((buffer_bytes + _PAGE) // _MIB + 1) * _MIB)
    reason = f"the largest stacked buffer of a step is {buffer_bytes / _MIB:.1f} MiB"
    if mmap_threshold > INT_MAX:
        mmap_threshold = INT_MAX // _MIB * _MIB
        reason += f"; mallopt's limit keeps the threshold at {mmap_threshold // _MIB} MiB"
    return HostMallocPlan(True, reason, mmap_threshold,
                          min(INT_MAX, TRIM_FACTOR * mmap_threshold))


def apply(p: HostMallocPlan) -> dict:
    """Sets ``p``'s thresholds in this process; returns what was done, for the log and the
    engine's ``uld_host_malloc_state``."""
    state = {"applied": False, "reason": p.reason, "mmap_threshold": None,
             "trim_threshold": None}
    if not p.apply:
        return state
    libc = _glibc()
    # mmap first: glibc stops adjusting both thresholds dynamically once either is set
    ok = (libc.mallopt(M_MMAP_THRESHOLD, p.mmap_threshold) == 1
          and libc.mallopt(M_TRIM_THRESHOLD, p.trim_threshold) == 1)
    if not ok:
        state["reason"] = f"glibc refused mallopt ({p.reason})"
        return state
    state.update(applied=True, mmap_threshold=p.mmap_threshold,
                 trim_threshold=p.trim_threshold)
    return state


def describe(state: dict) -> str:
    if not state["applied"]:
        return f"glibc malloc unchanged ({state['reason']})"
    return (f"glibc malloc keeps buffers up to {state['mmap_threshold'] // _MIB} MiB in its "
            f"heap and up to {state['trim_threshold'] // _MIB} MiB of freed heap "
            f"({state['reason']}; ULD_HOST_MALLOC=default keeps glibc's settings)")


def probe_faults(nbytes: int) -> int:
    """Minor page faults of writing a fresh ``nbytes`` buffer right after one of the same size
    was freed: ~0 when the heap kept it, ``nbytes / page`` when it was mapped again."""
    libc = _glibc()
    if libc is None:
        raise UldError("the page-fault probe needs glibc", "run it on Linux with glibc")
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    first = libc.malloc(nbytes)
    if not first:
        raise UldError(f"malloc({nbytes}) failed in the page-fault probe", "free memory")
    ctypes.memset(first, 1, nbytes)
    libc.free(first)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    second = libc.malloc(nbytes)
    if not second:
        raise UldError(f"malloc({nbytes}) failed in the page-fault probe", "free memory")
    ctypes.memset(second, 1, nbytes)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    libc.free(second)
    return faults


def _glibc():
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None)
    if not hasattr(libc, "gnu_get_libc_version"):
        return None
    return libc
