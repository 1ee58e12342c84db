"""Fused ULD sampling: plausibility filter + logit difference -> token ids, no logits written.

For callers that do not need vLLM's full sampler. Per row: the filter threshold (as in
``uld_combine``), an optional top-k over the combined scores, then greedy argmax or
Gumbel-max sampling: ``argmax(s / T - log E)`` with ``E ~ Exp(1)`` drawn by Philox from the
row's seed and the token index, which samples ``softmax(s / T)`` exactly and reproducibly.

With ``filter_ratio == 0`` the combined logits are ``log_softmax(l) - alpha*log_softmax(a)``,
which differ from ``l - alpha*a`` by a per-row constant; argmax and softmax ignore it, so that
path samples ``l - alpha*a`` and needs no log-sum-exp pass. The same holds for the
above-uniform penalty, but its shift and the gate's weight need the assistant's log-sum-exp:
with ``r > 0`` it is reduced in the threshold's first pass (as in ``uld_combine``), with
``r == 0`` by a pass of its own over the assistant row (``_select.split_rule`` when split).

Split-row variant (as in ``uld_combine``): the threshold and the top-k floor by split
selections, then per-chunk best (score, first index) merged by each row's last program.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._select import (
    STATE_WORDS,
    _row_stats,
    _row_threshold,
    _rule,
    _score_floor,
    _scores,
    key_passes,
    split_rule,
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
def _best_in_range(l_row, a_row, lo, hi, thr, floor, alpha, shift, temp, inv_t, seed,
                   ABOVE_UNIFORM: tl.constexpr, BLOCK: tl.constexpr):
    """The best (Gumbel-noised when ``temp > 0``) ULD score over tokens ``[lo, hi)`` and its
    first index. The noise is a function of (seed, token index) only, so one program per row
    and split-row draw the same ids."""
    best = tl.full((), float("-inf"), tl.float32)
    best_idx = tl.zeros((), tl.int32)
    for start in range(lo, hi, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        inb = offs < hi
        l = tl.load(l_row + offs, mask=inb, other=float("-inf")).to(tl.float32)
        a = tl.load(a_row + offs, mask=inb, other=0.0).to(tl.float32)
        s = _scores(l, a, thr, alpha, shift, False, ABOVE_UNIFORM)
        s = tl.where(s >= floor, s, float("-inf"))
        if temp > 0.0:
            # clamps keep -log E finite: u == 0 or u == 1 must not create or hide a winner
            u = tl.maximum(tl.rand(seed, offs), 1e-30)
            e = tl.maximum(-tl.log(u), 1e-30)
            s = tl.where(s > float("-inf"), s * inv_t - tl.log(e), float("-inf"))
        # first index of the maximum, as torch.argmax (strict > keeps earlier chunks on ties)
        c_max, c_idx = tl.max(s, 0, return_indices=True, return_indices_tie_break_left=True)
        better = c_max > best
        best_idx = tl.where(better, start + c_idx, best_idx)
        best = tl.where(better, c_max, best)
    return best, best_idx


@triton.jit
def _uld_sample_kernel(l_ptr, a_ptr, ids_ptr, alpha_ptr, temp_ptr, seed_ptr, top_k_ptr,
                       stride_l, stride_a, V, k, ln_r, log_v, gate_lo, gate_width,
                       FILTER: tl.constexpr, BLOCK: tl.constexpr, NPASS: tl.constexpr,
                       STATS: tl.constexpr, GATE: tl.constexpr, ABOVE_UNIFORM: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    l_row = l_ptr + row * stride_l
    a_row = a_ptr + row * stride_a
    alpha = tl.load(alpha_ptr + row)
    temp = tl.load(temp_ptr + row)
    top_k = tl.load(top_k_ptr + row)
    if FILTER:
        thr, m_a, z_a, t_a = _row_threshold(l_row, a_row, V, k, ln_r, BLOCK, NPASS, STATS)
    else:
        thr = tl.full((), float("-inf"), tl.float32)
        if STATS:  # no threshold pass to fuse the assistant's reduction into
            m_a, z_a, t_a = _row_stats(a_row, 0, V, BLOCK)
    shift = ln_r  # unused unless ABOVE_UNIFORM
    if STATS:
        alpha, shift = _rule(m_a, z_a, t_a, alpha, log_v, gate_lo, gate_width, GATE)
    floor = tl.full((), float("-inf"), tl.float32)
    if (top_k > 0) & (top_k < V):
        floor = _score_floor(l_row, a_row, V, top_k, thr, alpha, shift, ABOVE_UNIFORM, BLOCK)
    inv_t = 1.0 / tl.where(temp > 0.0, temp, 1.0)
    seed = tl.load(seed_ptr + row)
    best, best_idx = _best_in_range(l_row, a_row, 0, V, thr, floor, alpha, shift, temp, inv_t,
                                    seed, ABOVE_UNIFORM, BLOCK)
    tl.store(ids_ptr + row, best_idx.to(tl.int64))


@triton.jit
def _split_sample_kernel(l_ptr, a_ptr, ids_ptr, alpha_ptr, shift_ptr, temp_ptr, seed_ptr,
                         thr_ptr, floor_ptr, pval_ptr, pidx_ptr, ticket_ptr, stride_l, stride_a,
                         V, CHUNK, S, ABOVE_UNIFORM: tl.constexpr, BLOCK: tl.constexpr,
                         S_BLOCK: tl.constexpr):
    """Split-row choice: each chunk's best (noisy) score and its first index; the row's last
    program merges them (first chunk on ties, as ``torch.argmax``). Threshold and top-k floor
    come from split selections' states (word 3), the effective alpha and shift from the
    rule."""
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    l_row = l_ptr + row * stride_l
    a_row = a_ptr + row * stride_a
    alpha = tl.load(alpha_ptr + row)
    shift = alpha  # unused unless ABOVE_UNIFORM
    if ABOVE_UNIFORM:
        shift = tl.load(shift_ptr + row)
    temp = tl.load(temp_ptr + row)
    thr = tl.load(thr_ptr + row * STATE_WORDS + 3).to(tl.float32, bitcast=True)
    floor = tl.load(floor_ptr + row * STATE_WORDS + 3).to(tl.float32, bitcast=True)
    inv_t = 1.0 / tl.where(temp > 0.0, temp, 1.0)
    seed = tl.load(seed_ptr + row)
    lo = chunk * CHUNK
    hi = tl.minimum(lo + CHUNK, V)  # chunks need not be whole blocks
    best, best_idx = _best_in_range(l_row, a_row, lo, hi, thr, floor, alpha, shift, temp,
                                    inv_t, seed, ABOVE_UNIFORM, BLOCK)
    tl.store(pval_ptr + row * S + chunk, best)
    tl.store(pidx_ptr + row * S + chunk, best_idx)
    tl.debug_barrier()
    ticket = tl.atomic_add(ticket_ptr + row, 1, sem="acq_rel")
    if ticket == S - 1:
        j = tl.arange(0, S_BLOCK)
        vals = tl.load(pval_ptr + row * S + j, mask=j < S, other=float("-inf"),
                       cache_modifier=".cg")
        idxs = tl.load(pidx_ptr + row * S + j, mask=j < S, other=0, cache_modifier=".cg")
        v_max, j_max = tl.max(vals, 0, return_indices=True, return_indices_tie_break_left=True)
        idx = tl.sum(tl.where(j == j_max, idxs, 0), 0)
        # no kept token anywhere (all target logits -inf): id 0, as the one-program kernel
        tl.store(ids_ptr + row, tl.where(v_max > float("-inf"), idx, 0).to(tl.int64))


_NEG_INF_BITS = -8388608  # 0xFF800000: -inf's fp32 bits as an int32


def _sample_split(target, assistant, ids, alpha_vec, temp, seed_vec, top_k_vec, filter_ratio,
                  use_top_k, rule, plan, interpret):
    B, V = target.shape
    S, chunk, block = plan
    kw = split_launch_kw(block, interpret)
    dev = target.device
    none = torch.full((B, STATE_WORDS.value), _NEG_INF_BITS, device=dev, dtype=torch.int32)
    common = dict(S=S, chunk=chunk, block=block, launch_kw=kw)
    thr = none
    alpha_eff = shift = alpha_vec
    if filter_ratio > 0:
        thr = split_select(target, assistant, k=max(1, math.floor(filter_ratio * V)),
                           ln_r=math.log(filter_ratio), alpha=alpha_vec, rule=rule, **common)
        if rule.stats:
            thr, (alpha_eff, shift) = thr
    elif rule.stats:
        alpha_eff, shift = split_rule(assistant, alpha_vec, rule, **common)
    floor = none
    if use_top_k:
        floor = split_select(target, assistant, top_k=top_k_vec, thr=thr, alpha=alpha_eff,
                             shift=shift, rule=rule, **common)
    pval = torch.empty((B, S), device=dev, dtype=torch.float32)
    pidx = torch.empty((B, S), device=dev, dtype=torch.int32)
    ticket = torch.zeros((B,), device=dev, dtype=torch.int32)
    _split_sample_kernel[(B, S)](target, assistant, ids, alpha_eff, shift, temp, seed_vec, thr,
                                 floor, pval, pidx, ticket, target.stride(0),
                                 assistant.stride(0), V, chunk, S,
                                 ABOVE_UNIFORM=rule.above_uniform, BLOCK=block,
                                 S_BLOCK=triton.next_power_of_2(S), **kw)


def uld_sample_forward(target, assistant, alpha, filter_ratio, temperature, seeds, top_k,
                       split=None, penalty="logit", gate=None):
    target, assistant = check_logits(target, assistant, filter_ratio,
                                     _uld_sample_kernel)
    B, V = target.shape
    rule = Rule(penalty, gate, V)
    device = target.device
    ids = torch.zeros((B,), device=device, dtype=torch.int64)
    if B == 0 or V == 0:
        return ids
    alpha_vec = row_vector(alpha, B, device, torch.float32, "alpha")
    temp = row_vector(temperature, B, device, torch.float32, "temperature")
    if isinstance(temperature, torch.Tensor):
        bad = bool((temp < 0).any()) or not bool(torch.isfinite(temp).all())
    else:
        bad = not (math.isfinite(temperature) and temperature >= 0)
    if bad:
        raise ValueError("temperature must be finite and >= 0 (0 = greedy)")
    if seeds is None:
        # unseeded: fresh seeds from torch's generator (torch.manual_seed makes them repeat)
        seeds = torch.randint(0, 2**62, (B,), dtype=torch.int64)
    elif not isinstance(seeds, torch.Tensor):
        # one int for the batch: distinct Philox keys per row, so rows draw independently
        seeds = int(seeds) + torch.arange(B, dtype=torch.int64)
    seed_vec = row_vector(seeds, B, device, torch.int64, "seeds")
    top_k_vec = row_vector(0 if top_k is None else top_k, B, device, torch.int32, "top_k")
    interpret = interpreted(_uld_sample_kernel)
    plan = split_plan(B, V, device, split)
    if plan is not None:
        _sample_split(target, assistant, ids, alpha_vec, temp, seed_vec, top_k_vec,
                      filter_ratio, top_k is not None, rule, plan, interpret)
        LAUNCHES["sample", "split"] += 1
        return ids
    LAUNCHES["sample", "row"] += 1
    k = max(1, math.floor(filter_ratio * V))
    ln_r = math.log(filter_ratio) if filter_ratio > 0 else 0.0
    _uld_sample_kernel[(B,)](target, assistant, ids, alpha_vec, temp, seed_vec, top_k_vec,
                             target.stride(0), assistant.stride(0), V, k, ln_r, *rule.scalars,
                             FILTER=filter_ratio > 0, NPASS=key_passes(target.dtype),
                             **rule.flags, **launch_config(V, interpret))
    return ids


def uld_sample(target: torch.Tensor, assistant: torch.Tensor, *,
               alpha: float | torch.Tensor = 1.0, filter_ratio: float = 0.1,
               temperature: float | torch.Tensor = 0.0,
               seeds: int | torch.Tensor | None = None,
               top_k: int | torch.Tensor | None = None, penalty: str = "logit",
               gate: tuple[float, float] | None = None,
               split: bool | int | None = None) -> torch.Tensor:
    """Token ids ``[B]`` (int64) drawn from the ULD-combined logits (generate semantics).

    ``temperature``: float or ``[B]``; ``0`` is greedy (first index of the maximum, as
    ``torch.argmax`` of ``uld_logits``). Otherwise a draw from ``softmax(s / T)``, reproducible
    from ``seeds``: an int (row ``b`` uses ``seeds + b``) or an int64 ``[B]`` tensor of per-row
    seeds; ``None`` draws the seeds from torch's default generator. The noise is a function of
    seed and token index, so use a new seed per decode step. ``top_k``: int or ``[B]``,
    ``None``/``0`` for off; keeps the tokens whose combined score is at least the k-th largest
    (all ties at it). A row with no kept token (all target logits ``-inf``) returns id 0.
    ``penalty`` and ``gate``: the rule's options, as in ``uld_logits``.
    ``split``: launch variant, as in ``uld_combine`` (same ids either way, same noise too).
    """
    return uld_sample_forward(target, assistant, alpha, filter_ratio, temperature, seeds, top_k,
                              split, penalty, gate)
