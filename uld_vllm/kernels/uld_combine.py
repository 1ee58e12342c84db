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

The rule's options (``penalty="above_uniform"``, ``gate``) need the assistant row's max,
sum-exp and sum-exp-weighted logit (``_select._stats_step``) for its per-row effective alpha
and shift. That reduction rides on the first pass each variant makes anyway: the threshold's
first pass (one program per row; the split selection's pass 0, whose last program per row
merges the chunks' partials), or the ``r == 0`` log-sum-exp pass. So it adds one read of the
assistant row with ``r > 0`` and none with ``r == 0``; the paper's rule runs as before.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from uld_vllm.core.logits import MODES

from ._select import (
    STATE_WORDS,
    _row_threshold,
    _rule,
    _scores,
    _stats_merge,
    _stats_step,
    key_passes,
    split_select,
)
from ._utils import (
    LAUNCHES,
    Rule,
    check_logits,
    interpreted,
    launch_config,
    row_vector,
    split_launch_kw,
    split_plan,
)


@triton.jit
def _uld_filter_kernel(l_ptr, a_ptr, out_ptr, alpha_ptr, stride_l, stride_a, stride_o, V, k,
                       ln_r, log_v, gate_lo, gate_width, SCORE_MODE: tl.constexpr,
                       BLOCK: tl.constexpr, NPASS: tl.constexpr, STATS: tl.constexpr,
                       GATE: tl.constexpr, ABOVE_UNIFORM: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    l_row = l_ptr + row * stride_l
    a_row = a_ptr + row * stride_a
    out_row = out_ptr + row * stride_o
    alpha = tl.load(alpha_ptr + row)
    thr, m_a, z_a, t_a = _row_threshold(l_row, a_row, V, k, ln_r, BLOCK, NPASS, STATS)
    shift = ln_r  # unused unless ABOVE_UNIFORM
    if STATS:
        alpha, shift = _rule(m_a, z_a, t_a, alpha, log_v, gate_lo, gate_width, GATE)
    for start in range(0, V, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        inb = offs < V
        l = tl.load(l_row + offs, mask=inb, other=float("-inf")).to(tl.float32)
        a = tl.load(a_row + offs, mask=inb, other=0.0).to(tl.float32)
        tl.store(out_row + offs, _scores(l, a, thr, alpha, shift, SCORE_MODE, ABOVE_UNIFORM),
                 mask=inb)


@triton.jit
def _online_lse(m, s, x):
    """One chunk of a streaming log-sum-exp; an all -inf prefix stays (-inf, 0) without NaN."""
    m_new = tl.maximum(m, tl.max(x, 0))
    base = tl.where(m_new == float("-inf"), 0.0, m_new)
    return m_new, s * tl.exp(m - base) + tl.sum(tl.exp(x - base), 0)


@triton.jit
def _write_logprob_range(l_row, a_row, out_row, lo, hi, lse_l, lse_a, alpha, shift,
                         ABOVE_UNIFORM: tl.constexpr, BLOCK: tl.constexpr):
    """``r == 0``: write log p_target - alpha * penalty for tokens ``[lo, hi)``."""
    for start in range(lo, hi, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        inb = offs < hi
        l = tl.load(l_row + offs, mask=inb, other=float("-inf")).to(tl.float32)
        a = tl.load(a_row + offs, mask=inb, other=0.0).to(tl.float32)
        a_ninf = a == float("-inf")
        if ABOVE_UNIFORM:
            pen = tl.where(a_ninf, 0.0, tl.maximum(a - shift, 0.0))
            out = tl.where(l > float("-inf"), (l - lse_l) - alpha * pen, float("-inf"))
        else:
            # the reference zeroes a -inf assistant log-prob; with alpha != 0 the token is
            # dropped
            la = tl.where(a_ninf, 0.0, a - lse_a)
            ok = (l > float("-inf")) & ~tl.where(alpha != 0.0, a_ninf, False)
            out = tl.where(ok, (l - lse_l) - alpha * la, float("-inf"))
        tl.store(out_row + offs, out, mask=inb)


@triton.jit
def _uld_logprob_kernel(l_ptr, a_ptr, out_ptr, alpha_ptr, stride_l, stride_a, stride_o, V,
                        log_v, gate_lo, gate_width, BLOCK: tl.constexpr, STATS: tl.constexpr,
                        GATE: tl.constexpr, ABOVE_UNIFORM: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    l_row = l_ptr + row * stride_l
    a_row = a_ptr + row * stride_a
    out_row = out_ptr + row * stride_o
    alpha = tl.load(alpha_ptr + row)
    m_l = tl.full((), float("-inf"), tl.float32)
    m_a = tl.full((), float("-inf"), tl.float32)
    s_l = tl.zeros((), tl.float32)
    s_a = tl.zeros((), tl.float32)
    t_a = tl.zeros((), tl.float32)
    for start in range(0, V, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        inb = offs < V
        m_l, s_l = _online_lse(m_l, s_l, tl.load(l_row + offs, mask=inb,
                                                 other=float("-inf")).to(tl.float32))
        a = tl.load(a_row + offs, mask=inb, other=float("-inf")).to(tl.float32)
        if STATS:
            m_a, s_a, t_a = _stats_step(m_a, s_a, t_a, a)
        else:
            m_a, s_a = _online_lse(m_a, s_a, a)
    shift = log_v  # unused unless ABOVE_UNIFORM
    if STATS:
        alpha, shift = _rule(m_a, s_a, t_a, alpha, log_v, gate_lo, gate_width, GATE)
    _write_logprob_range(l_row, a_row, out_row, 0, V, m_l + tl.log(s_l), m_a + tl.log(s_a),
                         alpha, shift, ABOVE_UNIFORM, BLOCK)


@triton.jit
def _split_filter_kernel(l_ptr, a_ptr, out_ptr, alpha_ptr, shift_ptr, state_ptr, stride_l,
                         stride_a, stride_o, V, CHUNK, SCORE_MODE: tl.constexpr,
                         ABOVE_UNIFORM: tl.constexpr, BLOCK: tl.constexpr):
    """Split-row write: chunk ``program_id(1)`` of the row, given the threshold the split
    selection left in the row's state (word 3) and the row's rule (effective alpha, shift)."""
    row = tl.program_id(0).to(tl.int64)
    l_row = l_ptr + row * stride_l
    a_row = a_ptr + row * stride_a
    out_row = out_ptr + row * stride_o
    alpha = tl.load(alpha_ptr + row)
    shift = alpha  # unused unless ABOVE_UNIFORM
    if ABOVE_UNIFORM:
        shift = tl.load(shift_ptr + row)
    thr = tl.load(state_ptr + row * STATE_WORDS + 3).to(tl.float32, bitcast=True)
    lo = tl.program_id(1) * CHUNK
    hi = tl.minimum(lo + CHUNK, V)  # chunks need not be whole blocks
    for start in range(lo, hi, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        inb = offs < hi
        l = tl.load(l_row + offs, mask=inb, other=float("-inf")).to(tl.float32)
        a = tl.load(a_row + offs, mask=inb, other=0.0).to(tl.float32)
        tl.store(out_row + offs, _scores(l, a, thr, alpha, shift, SCORE_MODE, ABOVE_UNIFORM),
                 mask=inb)


# r == 0 split-row partials per (row, chunk): (max_l, sum_l, max_a, sum_a, T_a), T_a (for the
# rule, see _select._stats_step) only when the rule needs the assistant's statistics
PART_WORDS = tl.constexpr(5)


@triton.jit
def _split_lse_kernel(l_ptr, a_ptr, part_ptr, stride_l, stride_a, V, CHUNK, S,
                      STATS: tl.constexpr, BLOCK: tl.constexpr):
    """``r == 0``, split-row stage 1: each chunk's online log-sum-exp state of both rows."""
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    l_row = l_ptr + row * stride_l
    a_row = a_ptr + row * stride_a
    m_l = tl.full((), float("-inf"), tl.float32)
    m_a = tl.full((), float("-inf"), tl.float32)
    s_l = tl.zeros((), tl.float32)
    s_a = tl.zeros((), tl.float32)
    t_a = tl.zeros((), tl.float32)
    lo = chunk * CHUNK
    hi = tl.minimum(lo + CHUNK, V)  # chunks need not be whole blocks
    for start in range(lo, hi, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        inb = offs < hi
        m_l, s_l = _online_lse(m_l, s_l, tl.load(l_row + offs, mask=inb,
                                                 other=float("-inf")).to(tl.float32))
        a = tl.load(a_row + offs, mask=inb, other=float("-inf")).to(tl.float32)
        if STATS:
            m_a, s_a, t_a = _stats_step(m_a, s_a, t_a, a)
        else:
            m_a, s_a = _online_lse(m_a, s_a, a)
    part = part_ptr + (row * S + chunk) * PART_WORDS
    tl.store(part, m_l)
    tl.store(part + 1, s_l)
    tl.store(part + 2, m_a)
    tl.store(part + 3, s_a)
    if STATS:
        tl.store(part + 4, t_a)


@triton.jit
def _merge_lse(m, s):
    """Log-sum-exp of chunks given their (max, sum) states (masked lanes: (-inf, 0))."""
    m_all = tl.max(m, 0)
    base = tl.where(m_all == float("-inf"), 0.0, m_all)
    return m_all + tl.log(tl.sum(s * tl.exp(m - base), 0))


@triton.jit
def _split_logprob_kernel(l_ptr, a_ptr, out_ptr, alpha_ptr, part_ptr, stride_l, stride_a,
                          stride_o, V, CHUNK, S, log_v, gate_lo, gate_width,
                          STATS: tl.constexpr, GATE: tl.constexpr,
                          ABOVE_UNIFORM: tl.constexpr, BLOCK: tl.constexpr,
                          S_BLOCK: tl.constexpr):
    """``r == 0``, split-row stage 2: merge the row's chunk states, write this chunk."""
    row = tl.program_id(0).to(tl.int64)
    l_row = l_ptr + row * stride_l
    a_row = a_ptr + row * stride_a
    out_row = out_ptr + row * stride_o
    alpha = tl.load(alpha_ptr + row)
    j = tl.arange(0, S_BLOCK)
    part = part_ptr + (row * S + j) * PART_WORDS
    ok = j < S
    lse_l = _merge_lse(tl.load(part, mask=ok, other=float("-inf")),
                       tl.load(part + 1, mask=ok, other=0.0))
    shift = log_v  # unused unless ABOVE_UNIFORM
    if STATS:
        # every program of the row merges the same partials in the same order: one rule
        m_a, z_a, t_a = _stats_merge(tl.load(part + 2, mask=ok, other=float("-inf")),
                                     tl.load(part + 3, mask=ok, other=0.0),
                                     tl.load(part + 4, mask=ok, other=0.0))
        lse_a = m_a + tl.log(z_a)
        alpha, shift = _rule(m_a, z_a, t_a, alpha, log_v, gate_lo, gate_width, GATE)
    else:
        lse_a = _merge_lse(tl.load(part + 2, mask=ok, other=float("-inf")),
                           tl.load(part + 3, mask=ok, other=0.0))
    lo = tl.program_id(1) * CHUNK
    hi = tl.minimum(lo + CHUNK, V)  # chunks need not be whole blocks
    _write_logprob_range(l_row, a_row, out_row, lo, hi, lse_l, lse_a, alpha, shift,
                         ABOVE_UNIFORM, BLOCK)


def _combine_split(target, assistant, out, alpha_vec, filter_ratio, mode, rule, plan,
                   interpret):
    B, V = target.shape
    S, chunk, block = plan
    kw = split_launch_kw(block, interpret)
    strides = (target.stride(0), assistant.stride(0), out.stride(0))
    if filter_ratio == 0.0:
        part = torch.empty((B, S, PART_WORDS.value), device=target.device, dtype=torch.float32)
        _split_lse_kernel[(B, S)](target, assistant, part, *strides[:2], V, chunk, S,
                                  STATS=rule.stats, BLOCK=block, **kw)
        _split_logprob_kernel[(B, S)](target, assistant, out, alpha_vec, part, *strides, V,
                                      chunk, S, *rule.scalars, **rule.flags, BLOCK=block,
                                      S_BLOCK=triton.next_power_of_2(S), **kw)
        return
    k = max(1, math.floor(filter_ratio * V))
    state = split_select(target, assistant, S=S, chunk=chunk, block=block, k=k,
                         ln_r=math.log(filter_ratio), alpha=alpha_vec, rule=rule, launch_kw=kw)
    alpha_eff = shift = alpha_vec
    if rule.stats:
        state, (alpha_eff, shift) = state
    _split_filter_kernel[(B, S)](target, assistant, out, alpha_eff, shift, state, *strides, V,
                                 chunk, SCORE_MODE=mode == "score",
                                 ABOVE_UNIFORM=rule.above_uniform, BLOCK=block, **kw)


def uld_combine_forward(target, assistant, alpha, filter_ratio, mode, split=None,
                        penalty="logit", gate=None):
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    target, assistant = check_logits(target, assistant, filter_ratio,
                                     _uld_filter_kernel)
    B, V = target.shape
    rule = Rule(penalty, gate, V)
    out = torch.empty((B, V), device=target.device, dtype=torch.float32)
    if B == 0 or V == 0:
        return out
    alpha_vec = row_vector(alpha, B, target.device, torch.float32, "alpha")
    interpret = interpreted(_uld_filter_kernel)
    plan = split_plan(B, V, target.device, split)
    if plan is not None:
        _combine_split(target, assistant, out, alpha_vec, filter_ratio, mode, rule, plan,
                       interpret)
        LAUNCHES["combine", "split"] += 1
        return out
    LAUNCHES["combine", "row"] += 1
    config = launch_config(V, interpret)
    args = (target, assistant, out, alpha_vec, target.stride(0), assistant.stride(0),
            out.stride(0), V)
    if filter_ratio == 0.0:
        _uld_logprob_kernel[(B,)](*args, *rule.scalars, **rule.flags, **config)
    else:
        k = max(1, math.floor(filter_ratio * V))
        _uld_filter_kernel[(B,)](*args, k, math.log(filter_ratio), *rule.scalars,
                                 SCORE_MODE=mode == "score", NPASS=key_passes(target.dtype),
                                 **rule.flags, **config)
    return out


def uld_combine(target: torch.Tensor, assistant: torch.Tensor, *,
                alpha: float | torch.Tensor = 1.0, filter_ratio: float = 0.1,
                mode: str = "generate", penalty: str = "logit",
                gate: tuple[float, float] | None = None,
                split: bool | int | None = None) -> torch.Tensor:
    """ULD-combined logits, fp32 ``[B, V]``; a fused drop-in for ``uld_logits``.

    ``target``/``assistant``: ``[B, V]`` fp32/bf16/fp16 (row stride free, unit column stride),
    CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``. ``alpha``: float or ``[B]``.
    ``mode="generate"`` masks filtered tokens with ``-inf`` (for vLLM's sampler);
    ``mode="score"`` keeps the target logit there. ``filter_ratio == 0`` gives
    ``log_softmax(l) - alpha * log_softmax(a)``. ``penalty`` (``"logit"``, the paper, or
    ``"above_uniform"``) and ``gate`` (``(lo, hi)`` nats or ``None``) as in ``uld_logits``; the
    gate's KL and the above-uniform shift come from one reduction over the assistant row on
    the device, fused into the first pass the kernels make anyway.

    ``split``: the launch variant, same result either way. ``None`` picks by shape (split-row
    when the batch alone cannot fill the GPU, see ``_utils.split_plan``); ``False``: one
    program per row; ``True`` or an int: several programs per row (that many, for an int).
    """
    return uld_combine_forward(target, assistant, alpha, filter_ratio, mode, split, penalty,
                               gate)
