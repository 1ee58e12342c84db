"""Host-side helpers shared by the launchers: input checks, per-row parameters, launch sizes."""

from __future__ import annotations

import math
from collections import Counter

import torch
import triton

from uld_vllm.core.logits import PENALTIES, check_gate

try:  # where the interpreter lives has moved between Triton releases
    from triton.runtime.interpreter import InterpretedFunction
except ImportError:  # pragma: no cover
    InterpretedFunction = ()

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def interpreted(kernel) -> bool:
    """Whether ``kernel`` runs in the Triton interpreter (``TRITON_INTERPRET=1`` at import)."""
    return isinstance(kernel, InterpretedFunction)


def check_interpreter(kernel) -> None:
    """Interpreted kernels also need Triton's own library (tl.max, tl.rand...) interpreted."""
    if interpreted(kernel) and not interpreted(triton.language.standard.max):
        raise RuntimeError("TRITON_INTERPRET=1 was set after triton was imported, so only part "
                           "of Triton runs in the interpreter: set it before importing triton "
                           "(or anything that imports it, e.g. vllm)")


def check_logits(target: torch.Tensor, assistant: torch.Tensor, filter_ratio: float,
                 kernel) -> list[torch.Tensor]:
    """Validate a ``[B, V]`` pair; returns both with unit column stride (row stride is free)."""
    check_interpreter(kernel)
    if not isinstance(target, torch.Tensor) or not isinstance(assistant, torch.Tensor):
        raise ValueError("target and assistant logits must be torch tensors")
    if target.dim() != 2 or target.shape != assistant.shape:
        raise ValueError(
            "target and assistant logits must both be [B, V] with the same shape, got "
            f"{tuple(target.shape)} and {tuple(assistant.shape)}")
    for name, t in (("target", target), ("assistant", assistant)):
        if t.dtype not in DTYPES:
            raise ValueError(f"{name} logits must be float32, bfloat16 or float16, got {t.dtype}")
    if target.device != assistant.device:
        raise ValueError(f"target and assistant logits are on different devices: "
                         f"{target.device} and {assistant.device}")
    if target.device.type != "cuda" and not interpreted(kernel):
        raise ValueError(f"the ULD Triton kernels need CUDA tensors, got {target.device}: set "
                         "TRITON_INTERPRET=1 before importing uld_vllm.kernels to run them on "
                         "CPU (slow), or use uld_vllm.core.logits.uld_logits")
    if not 0.0 <= filter_ratio < 1.0:
        raise ValueError(f"filter_ratio must be in [0, 1), got {filter_ratio}")
    if target.shape[1] >= 2**31:
        raise ValueError(f"vocabulary of {target.shape[1]} tokens is too large (int32 offsets)")
    # the kernels walk a row with unit stride; any row stride (padding, views) is fine
    return ([t if t.stride(1) == 1 or t.shape[1] == 1 else t.contiguous()
             for t in (target, assistant)])


def row_vector(value, rows: int, device, dtype: torch.dtype, name: str) -> torch.Tensor:
    """A float/int or ``[B]`` tensor as a contiguous ``[B]`` tensor of ``dtype`` on ``device``."""
    if isinstance(value, torch.Tensor):
        if value.dim() == 0:
            value = value.reshape(1).expand(rows)
        if value.shape != (rows,):
            raise ValueError(f"{name} tensor must have shape [{rows}], got {tuple(value.shape)}")
        return value.to(device=device, dtype=dtype).contiguous()
    return torch.full((rows,), value, device=device, dtype=dtype)


class Rule:
    """The host side of the rule's options (``uld_logits``'s ``penalty`` and ``gate``) for the
    launchers: ``flags``, the kernels' constexprs (``STATS``: the assistant row is reduced
    first, as the gate and the above-uniform shift both need its log-sum-exp), and
    ``scalars``, their ``(log_v, gate_lo, gate_width)`` arguments."""

    def __init__(self, penalty: str, gate, V: int):
        if penalty not in PENALTIES:
            raise ValueError(f"penalty must be one of {PENALTIES}, got {penalty!r}")
        check_gate(gate)
        self.gate = gate is not None
        self.above_uniform = penalty == "above_uniform"
        self.stats = self.gate or self.above_uniform
        lo, hi = gate if gate is not None else (0.0, 1.0)
        self.scalars = (math.log(V) if V > 0 else 0.0, float(lo), float(hi - lo))
        self.flags = dict(STATS=self.stats, GATE=self.gate, ABOVE_UNIFORM=self.above_uniform)


def launch_config(V: int, interpret: bool) -> dict:
    """Chunk size and warps; the interpreter uses the GPU's chunking so tests cover the loops.

    One program per row: at small B most SMs idle (a split-row variant would need a grid-wide
    sync per radix pass); untuned, as no GPU was available when this was written.
    """
    block = min(triton.next_power_of_2(V), 4096)
    if interpret:
        return {"BLOCK": block}
    return {"BLOCK": block, "num_warps": 8 if block >= 2048 else 4}


# --- split-row launches ------------------------------------------------------------------------

# which variant each op last launched with, counted: tests check that the split path really
# ran (it must not fall back silently), the benchmark reports it
LAUNCHES: Counter = Counter()
PROGRAMS_PER_SM = 8  # split target: this many programs per SM over the whole grid (8 warps
# each: 64, a Hopper SM's limit, if registers allow; unmeasured)
SPLIT_BLOCK = 2048   # elements per loop step of a split program (at most)
MAX_SPLIT = 1024  # programs per row at most (the row's last program reduces S partials)
MIN_SPLIT_BLOCK = 1024  # automatic chunks have at least this many tokens (tiny programs
# waste their launch and merge; an explicit count may go down to 16 so tests split short rows)
_SM_COUNT: dict = {}


def sm_count(device) -> int:
    """Streaming multiprocessors of ``device``; 132 (an H200/H100 SXM) for the interpreter, so
    CPU tests take the decisions a GPU would."""
    if device.type != "cuda":
        return 132
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


def split_plan(B: int, V: int, device, split=None) -> tuple[int, int, int] | None:
    """``(S, chunk, block)`` for a split-row launch (``S`` programs per row, each ``chunk``
    elements in steps of ``block``), or ``None`` for one program per row.

    ``split``: ``None`` decides by shape, ``False`` never splits, ``True`` splits with the
    automatic program count, an int asks for that many programs per row (fewer only when a
    row has fewer than 16 tokens per program, and at most ``MAX_SPLIT``). The automatic
    count fills one wave of ``PROGRAMS_PER_SM`` programs per SM, ``S = floor(8 * n_sm / B)``
    (rounding down: a second, mostly empty wave would cost as much as the first), with chunks
    of at least ``MIN_SPLIT_BLOCK`` tokens. So rows are split when ``B <= 4 * n_sm`` (528 on
    an H200) and a row has more than ``MIN_SPLIT_BLOCK`` tokens; above that one program per
    row already fills the GPU and saves the merge. B = 1, V = 32000: 32 programs of 1000
    tokens; B = 256, V = 151936: 4 of 37984. Chunks are multiples of 16 tokens (aligned
    vector loads).
    Untuned: chosen without a GPU.
    """
    if split is False:
        return None
    if split is None or split is True:
        want = max(1, PROGRAMS_PER_SM * sm_count(device) // B)
        smallest = MIN_SPLIT_BLOCK
    elif isinstance(split, int) and split >= 1:
        want, smallest = split, 1
    else:
        raise ValueError(f"split must be None, a bool or a positive int, got {split!r}")
    share = max(-(-V // min(want, MAX_SPLIT)), smallest)
    chunk = -(-share // 16) * 16
    block = min(SPLIT_BLOCK, triton.next_power_of_2(chunk))
    S = -(-V // chunk)
    if S < 2 and split is None:
        return None
    return S, chunk, block


def split_launch_kw(block: int, interpret: bool) -> dict:
    """Warps of a split-row program (the interpreter takes none)."""
    return {} if interpret else {"num_warps": 8 if block >= 2048 else 4}
