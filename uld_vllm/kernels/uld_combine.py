"""Fused ULD combine: plausibility filter + logit difference -> combined logits.

Same result as ``uld_vllm.core.logits.uld_logits`` (see its docstring for the rule). Two launch
variants, chosen by shape (``_utils.split_plan``) or by ``split=``:

* one program per row: with ``r > 0`` it reads the target row for the max and a radix select
  of the k-th largest logit (``_select.py``; one to four passes, as the dtype and the ratio
  test allow), then reads both rows once and writes the output once. With ``r == 0`` it
  computes both log-sum-exps online in one pass and writes in a second.
* split-row, S programs per row over vocabulary chunks: one launch per radix pass with the
  rows' histograms merged on the device (``_select.split_select``), then one write launch;
  with ``r == 0`` per-chunk log-sum-exp states, merged by the writing programs.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from uld_vllm.core.logits import MODES

from ._select import STATE_WORDS, _row_threshold, _scores, key_passes, split_select
from ._utils import (
    LAUNCHES,
    check_logits,
    interpreted,
    launch_config,
    row_vector,
    split_launch_kw,
    split_plan,
)


@triton.jit
def _uld_filter_kernel(l_ptr, a_ptr, out_ptr, alpha_ptr, stride_l, stride_a, stride_o, V, k,
                       ln_r, SCORE_MODE: tl.constexpr, BLOCK: tl.constexpr,
                       NPASS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    l_row = l_ptr + row * stride_l
    a_row = a_ptr + row * stride_a
    out_row = out_ptr + row * stride_o
    alpha = tl.load(alpha_ptr + row)
    thr = _row_threshold(l_row, V, k, ln_r, BLOCK, NPASS)
    for start in range(0, V, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        inb = offs < V
        l = tl.load(l_row + offs, mask=inb, other=float("-inf")).to(tl.float32)
        a = tl.load(a_row + offs, mask=inb, other=0.0).to(tl.float32)
        tl.store(out_row + offs, _scores(l, a, thr, alpha, SCORE_MODE), mask=inb)


@triton.jit
def _online_lse(m, s, x):
    """One chunk of a streaming log-sum-exp; an all -inf prefix stays (-inf, 0) without NaN."""
    m_new = tl.maximum(m, tl.max(x, 0))
    base = tl.where(m_new == float("-inf"), 0.0, m_new)
    return m_new, s * tl.exp(m - base) + tl.sum(tl.exp(x - base), 0)


@triton.jit
def _write_logprob_range(l_row, a_row, out_row, lo, hi, lse_l, lse_a, alpha,
                         BLOCK: tl.constexpr):
    """``r == 0``: write log p_target - alpha * log p_assistant for tokens ``[lo, hi)``."""
    for start in range(lo, hi, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        inb = offs < hi
        l = tl.load(l_row + offs, mask=inb, other=float("-inf")).to(tl.float32)
        a = tl.load(a_row + offs, mask=inb, other=0.0).to(tl.float32)
        a_ninf = a == float("-inf")
        # the reference zeroes a -inf assistant log-prob; with alpha != 0 the token is dropped
        la = tl.where(a_ninf, 0.0, a - lse_a)
        ok = (l > float("-inf")) & ~tl.where(alpha != 0.0, a_ninf, False)
        out = tl.where(ok, (l - lse_l) - alpha * la, float("-inf"))
        tl.store(out_row + offs, out, mask=inb)


@triton.jit
def _uld_logprob_kernel(l_ptr, a_ptr, out_ptr, alpha_ptr, stride_l, stride_a, stride_o, V,
                        BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    l_row = l_ptr + row * stride_l
    a_row = a_ptr + row * stride_a
    out_row = out_ptr + row * stride_o
    alpha = tl.load(alpha_ptr + row)
    m_l = tl.full((), float("-inf"), tl.float32)
    m_a = tl.full((), float("-inf"), tl.float32)
    s_l = tl.zeros((), tl.float32)
    s_a = tl.zeros((), tl.float32)
    for start in range(0, V, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        inb = offs < V
        m_l, s_l = _online_lse(m_l, s_l, tl.load(l_row + offs, mask=inb,
                                                 other=float("-inf")).to(tl.float32))
        m_a, s_a = _online_lse(m_a, s_a, tl.load(a_row + offs, mask=inb,
                                                 other=float("-inf")).to(tl.float32))
    _write_logprob_range(l_row, a_row, out_row, 0, V, m_l + tl.log(s_l), m_a + tl.log(s_a),
                         alpha, BLOCK)


@triton.jit
def _split_filter_kernel(l_ptr, a_ptr, out_ptr, alpha_ptr, state_ptr, stride_l, stride_a,
                         stride_o, V, CHUNK, SCORE_MODE: tl.constexpr, BLOCK: tl.constexpr):
    """Split-row write: chunk ``program_id(1)`` of the row, given the threshold the split
    selection left in the row's state (word 3)."""
    row = tl.program_id(0).to(tl.int64)
    l_row = l_ptr + row * stride_l
    a_row = a_ptr + row * stride_a
    out_row = out_ptr + row * stride_o
    alpha = tl.load(alpha_ptr + row)
    thr = tl.load(state_ptr + row * STATE_WORDS + 3).to(tl.float32, bitcast=True)
    lo = tl.program_id(1) * CHUNK
    hi = tl.minimum(lo + CHUNK, V)  # chunks need not be whole blocks
    for start in range(lo, hi, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        inb = offs < hi
        l = tl.load(l_row + offs, mask=inb, other=float("-inf")).to(tl.float32)
        a = tl.load(a_row + offs, mask=inb, other=0.0).to(tl.float32)
        tl.store(out_row + offs, _scores(l, a, thr, alpha, SCORE_MODE), mask=inb)


@triton.jit
def _split_lse_kernel(l_ptr, a_ptr, part_ptr, stride_l, stride_a, V, CHUNK, S,
                      BLOCK: tl.constexpr):
    """``r == 0``, split-row stage 1: each chunk's online log-sum-exp state of both rows,
    ``part[row, chunk] = (max_l, sum_l, max_a, sum_a)``."""
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    l_row = l_ptr + row * stride_l
    a_row = a_ptr + row * stride_a
    m_l = tl.full((), float("-inf"), tl.float32)
    m_a = tl.full((), float("-inf"), tl.float32)
    s_l = tl.zeros((), tl.float32)
    s_a = tl.zeros((), tl.float32)
    lo = chunk * CHUNK
    hi = tl.minimum(lo + CHUNK, V)  # chunks need not be whole blocks
    for start in range(lo, hi, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        inb = offs < hi
        m_l, s_l = _online_lse(m_l, s_l, tl.load(l_row + offs, mask=inb,
                                                 other=float("-inf")).to(tl.float32))
        m_a, s_a = _online_lse(m_a, s_a, tl.load(a_row + offs, mask=inb,
                                                 other=float("-inf")).to(tl.float32))
    part = part_ptr + (row * S + chunk) * 4
    tl.store(part, m_l)
    tl.store(part + 1, s_l)
    tl.store(part + 2, m_a)
    tl.store(part + 3, s_a)


@triton.jit
def _merge_lse(m, s):
    """Log-sum-exp of chunks given their (max, sum) states (masked lanes: (-inf, 0))."""
    m_all = tl.max(m, 0)
    base = tl.where(m_all == float("-inf"), 0.0, m_all)
    return m_all + tl.log(tl.sum(s * tl.exp(m - base), 0))


@triton.jit
def _split_logprob_kernel(l_ptr, a_ptr, out_ptr, alpha_ptr, part_ptr, stride_l, stride_a,
                          stride_o, V, CHUNK, S, BLOCK: tl.constexpr, S_BLOCK: tl.constexpr):
    """``r == 0``, split-row stage 2: merge the row's chunk states, write this chunk."""
    row = tl.program_id(0).to(tl.int64)
    l_row = l_ptr + row * stride_l
    a_row = a_ptr + row * stride_a
    out_row = out_ptr + row * stride_o
    alpha = tl.load(alpha_ptr + row)
    j = tl.arange(0, S_BLOCK)
    part = part_ptr + (row * S + j) * 4
    ok = j < S
    lse_l = _merge_lse(tl.load(part, mask=ok, other=float("-inf")),
                       tl.load(part + 1, mask=ok, other=0.0))
    lse_a = _merge_lse(tl.load(part + 2, mask=ok, other=float("-inf")),
                       tl.load(part + 3, mask=ok, other=0.0))
    lo = tl.program_id(1) * CHUNK
    hi = tl.minimum(lo + CHUNK, V)  # chunks need not be whole blocks
    _write_logprob_range(l_row, a_row, out_row, lo, hi, lse_l, lse_a, alpha, BLOCK)


def _combine_split(target, assistant, out, alpha_vec, filter_ratio, mode, plan, interpret):
    B, V = target.shape
    S, chunk, block = plan
    kw = split_launch_kw(block, interpret)
    strides = (target.stride(0), assistant.stride(0), out.stride(0))
    if filter_ratio == 0.0:
        part = torch.empty((B, S, 4), device=target.device, dtype=torch.float32)
        _split_lse_kernel[(B, S)](target, assistant, part, *strides[:2], V, chunk, S,
                                  BLOCK=block, **kw)
        _split_logprob_kernel[(B, S)](target, assistant, out, alpha_vec, part, *strides, V,
                                      chunk, S, BLOCK=block,
                                      S_BLOCK=triton.next_power_of_2(S), **kw)
        return
    k = max(1, math.floor(filter_ratio * V))
    state = split_select(target, assistant, S=S, chunk=chunk, block=block, k=k,
                         ln_r=math.log(filter_ratio), launch_kw=kw)
    _split_filter_kernel[(B, S)](target, assistant, out, alpha_vec, state, *strides, V, chunk,
                                 SCORE_MODE=mode == "score", BLOCK=block, **kw)


def uld_combine_forward(target, assistant, alpha, filter_ratio, mode, split=None):
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    target, assistant = check_logits(target, assistant, filter_ratio,
                                     _uld_filter_kernel)
    B, V = target.shape
    out = torch.empty((B, V), device=target.device, dtype=torch.float32)
    if B == 0 or V == 0:
        return out
    alpha_vec = row_vector(alpha, B, target.device, torch.float32, "alpha")
    interpret = interpreted(_uld_filter_kernel)
    plan = split_plan(B, V, target.device, split)
    if plan is not None:
        _combine_split(target, assistant, out, alpha_vec, filter_ratio, mode, plan, interpret)
        LAUNCHES["combine", "split"] += 1
        return out
    LAUNCHES["combine", "row"] += 1
    config = launch_config(V, interpret)
    args = (target, assistant, out, alpha_vec, target.stride(0), assistant.stride(0),
            out.stride(0), V)
    if filter_ratio == 0.0:
        _uld_logprob_kernel[(B,)](*args, **config)
    else:
        k = max(1, math.floor(filter_ratio * V))
        _uld_filter_kernel[(B,)](*args, k, math.log(filter_ratio),
                                 SCORE_MODE=mode == "score", NPASS=key_passes(target.dtype),
                                 **config)
    return out


def uld_combine(target: torch.Tensor, assistant: torch.Tensor, *,
                alpha: float | torch.Tensor = 1.0, filter_ratio: float = 0.1,
                mode: str = "generate", split: bool | int | None = None) -> torch.Tensor:
    """ULD-combined logits, fp32 ``[B, V]``; a fused drop-in for ``uld_logits``.

    ``target``/``assistant``: ``[B, V]`` fp32/bf16/fp16 (row stride free, unit column stride),
    CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``. ``alpha``: float or ``[B]``.
    ``mode="generate"`` masks filtered tokens with ``-inf`` (for vLLM's sampler);
    ``mode="score"`` keeps the target logit there. ``filter_ratio == 0`` gives
    ``log_softmax(l) - alpha * log_softmax(a)``.

    ``split``: the launch variant, same result either way. ``None`` picks by shape (split-row
    when the batch alone cannot fill the GPU, see ``_utils.split_plan``); ``False``: one
    program per row; ``True`` or an int: several programs per row (that many, for an int).
    """
    return uld_combine_forward(target, assistant, alpha, filter_ratio, mode, split)
