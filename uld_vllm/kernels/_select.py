"""Shared device helpers: the ULD score of a token, an exact k-th-largest selection, and the
assistant row's statistics that the gate and the above-uniform penalty need.

The plausibility filter needs ``kth_largest(l, k)`` per row with ``k = floor(r * V)`` (about
1.3k-15k of 128k). A sort reads and writes the row ~log(V) times; instead the row is reduced
to a radix select over order-preserving ``uint32`` keys of its fp32 values: four passes, each
a 256-bin histogram of the next 8 key bits among the elements that still match the prefix
found so far (only two for a bf16 row and three for fp16: the low 16 / 13 bits of their fp32
keys are known, see ``_complete_key``). The result is the exact bit pattern of the k-th
largest value, so thresholds
(and hence greedy token ids) equal the torch reference bit for bit. The first pass is fused
with the row max by the caller, and the later passes are skipped as soon as the prefix proves
that the k-th largest value lies above ``max + ln r`` (then the ratio test decides alone).
One program owns one row, so the repeated passes over it are meant to hit L2 rather than
HBM (a 152k-token bf16 row is 300 KB); whether they do at large B is what the benchmark shows.
"""

import torch
import triton
import triton.language as tl

from ._utils import Rule

DIGIT_BITS = tl.constexpr(8)
NBINS = tl.constexpr(256)


@triton.jit
def _to_key(x):
    # IEEE order -> unsigned order: flip all bits of negatives, only the sign bit of positives
    bits = x.to(tl.uint32, bitcast=True)
    flip = (x.to(tl.int32, bitcast=True) >> 31).to(tl.uint32, bitcast=True) | 0x80000000
    return bits ^ flip


@triton.jit
def _from_key(key):
    flip = tl.where(key >= 0x80000000, 0x80000000, 0xFFFFFFFF).to(tl.uint32)
    return (key ^ flip).to(tl.float32, bitcast=True)


@triton.jit
def _scores(l, a, thr, alpha, shift, SCORE_MODE: tl.constexpr, ABOVE_UNIFORM: tl.constexpr):
    """ULD score of each token given the row threshold (``uld_logits`` semantics).

    ``thr = -inf`` gives the unfiltered rule (every finite target logit kept). ``alpha`` is the
    row's effective weight (after the gate); ``shift = lse(a) - log V`` (``ABOVE_UNIFORM``
    only), so that the above-uniform penalty is ``max(0, a - shift)``.
    """
    if ABOVE_UNIFORM:
        # a -inf assistant logit is no preference at all: penalty 0, the token stays kept
        pen = tl.where(a == float("-inf"), 0.0, tl.maximum(a - shift, 0.0))
        keep = (l >= thr) & (l > float("-inf"))
        s = tl.fma(-alpha, pen, l)
    else:
        a_ninf = a == float("-inf")
        # a -inf target is never kept, even when thr is -inf (fewer than k finite logits)
        a_bad = tl.where(alpha != 0.0, a_ninf, False)  # alpha == 0 ignores the assistant
        keep = (l >= thr) & (l > float("-inf")) & ~a_bad
        # fma: torch.addcmul rounds once too, so kept scores match the reference bit for bit
        s = tl.where(a_ninf, l, tl.fma(-alpha, a, l))
    if SCORE_MODE:
        out = tl.where(keep, s, l)
    else:
        out = tl.where(keep, s, float("-inf"))
    return out


@triton.jit
def _load_values(l_row, a_row, offs, inb, thr, alpha, shift, ON_SCORES: tl.constexpr,
                 ABOVE_UNIFORM: tl.constexpr):
    x = tl.load(l_row + offs, mask=inb, other=float("-inf")).to(tl.float32)
    if ON_SCORES:
        a = tl.load(a_row + offs, mask=inb, other=0.0).to(tl.float32)
        x = _scores(x, a, thr, alpha, shift, False, ABOVE_UNIFORM)
    return x


@triton.jit
def _hist_pass(l_row, a_row, V, prefix, thr, alpha, shift, SHIFT: tl.constexpr,
               ON_SCORES: tl.constexpr, ABOVE_UNIFORM: tl.constexpr, BLOCK: tl.constexpr):
    """Histogram of key bits [SHIFT, SHIFT+8) among elements whose higher bits equal prefix's."""
    hist = tl.zeros((NBINS,), tl.int32)
    for start in range(0, V, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        inb = offs < V
        key = _to_key(_load_values(l_row, a_row, offs, inb, thr, alpha, shift, ON_SCORES,
                                   ABOVE_UNIFORM))
        if SHIFT + DIGIT_BITS < 32:
            inb = inb & ((key >> (SHIFT + DIGIT_BITS)) == (prefix >> (SHIFT + DIGIT_BITS)))
        digit = ((key >> SHIFT) & 0xFF).to(tl.int32)
        hist += tl.histogram(digit, NBINS, mask=inb)
    return hist


@triton.jit
def _pick_digit(hist, k_rem, prefix, SHIFT: tl.constexpr):
    """The digit holding the k_rem-th largest candidate, and k_rem within that digit's bin."""
    count_ge = tl.sum(hist, 0) - tl.cumsum(hist, 0) + hist  # candidates with digit >= d
    # count_ge is non-increasing, so the wanted digit is the last d with count_ge[d] >= k_rem
    digit = tl.sum((count_ge >= k_rem).to(tl.int32), 0) - 1
    above = tl.sum(tl.where(tl.arange(0, NBINS) == digit, count_ge - hist, 0), 0)
    return prefix | (digit.to(tl.uint32) << SHIFT), k_rem - above


@triton.jit
def _kth_key(l_row, a_row, V, k, hist, floor_key, thr, alpha, shift,
             ON_SCORES: tl.constexpr, ABOVE_UNIFORM: tl.constexpr, BLOCK: tl.constexpr,
             NPASS: tl.constexpr):
    """Key of the k-th largest value of a row (1 <= k <= V), given the histogram of its top
    8 key bits. Stops early, returning a partial key above ``floor_key``, once the k-th
    largest value is known to exceed ``floor_key`` (the caller only needs ``min`` with it).
    """
    prefix, k_rem = _pick_digit(hist, k, tl.zeros((), tl.uint32), 24)
    for p in tl.static_range(1, NPASS):
        if prefix <= floor_key:
            hist = _hist_pass(l_row, a_row, V, prefix, thr, alpha, shift, 24 - 8 * p,
                              ON_SCORES, ABOVE_UNIFORM, BLOCK)
            prefix, k_rem = _pick_digit(hist, k_rem, prefix, 24 - 8 * p)
    return _complete_key(prefix, NPASS)


@triton.jit
def _row_threshold(l_row, a_row, V, k, ln_r, BLOCK: tl.constexpr, NPASS: tl.constexpr,
                   STATS: tl.constexpr):
    """``min(kth_largest(l, k), max(l) + ln r)`` of one row, bit-exact to the torch reference.
    ``NPASS``: radix passes the target's dtype needs (``key_passes``). ``STATS``: the first
    pass also reduces the assistant row (``_stats_step``), returned after the threshold."""
    m = tl.full((), float("-inf"), tl.float32)
    hist = tl.zeros((NBINS,), tl.int32)
    m_a = tl.full((), float("-inf"), tl.float32)
    z_a = tl.zeros((), tl.float32)
    t_a = tl.zeros((), tl.float32)
    for start in range(0, V, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        inb = offs < V
        l = tl.load(l_row + offs, mask=inb, other=float("-inf")).to(tl.float32)
        m = tl.maximum(m, tl.max(l, 0))
        hist += tl.histogram((_to_key(l) >> 24).to(tl.int32), NBINS, mask=inb)
        if STATS:
            a = tl.load(a_row + offs, mask=inb, other=float("-inf")).to(tl.float32)
            m_a, z_a, t_a = _stats_step(m_a, z_a, t_a, a)
    ratio_thr = m + ln_r
    key = _kth_key(l_row, l_row, V, k, hist, _to_key(ratio_thr), ratio_thr, ratio_thr,
                   ratio_thr, False, False, BLOCK, NPASS)
    return tl.minimum(_from_key(key), ratio_thr), m_a, z_a, t_a


@triton.jit
def _score_floor(l_row, a_row, V, top_k, thr, alpha, shift, ABOVE_UNIFORM: tl.constexpr,
                 BLOCK: tl.constexpr):
    """The top_k-th largest generate-mode score of a row (ties at it are all kept)."""
    hist = _hist_pass(l_row, a_row, V, tl.zeros((), tl.uint32), thr, alpha, shift, 24, True,
                      ABOVE_UNIFORM, BLOCK)
    never = tl.full((), 0xFFFFFFFF, tl.uint32)
    return _from_key(_kth_key(l_row, a_row, V, top_k, hist, never, thr, alpha, shift, True,
                              ABOVE_UNIFORM, BLOCK, 4))


# --- the assistant row's statistics: the confidence gate and the above-uniform shift ---------
#
# Both need one reduction over the assistant row a: its max m, Z = sum e^(a-m) and
# T = sum e^(a-m) (a-m), streamed like a log-sum-exp. Then lse(a) = m + log Z and
# KL(p_a || U) = log V + sum p log p = log V + T/Z - log Z, with no second pass for p.


@triton.jit
def _stats_step(m, z, t, a):
    """Fold one chunk ``a`` into the running ``(m, Z, T)``; masked lanes and -inf entries
    load as -inf and add nothing."""
    m_new = tl.maximum(m, tl.max(a, 0))
    base = tl.where(m_new == float("-inf"), 0.0, m_new)
    d = a - base
    e = tl.exp(d)
    c = tl.exp(m - base)
    # 0 * -inf is NaN: a -inf entry's e * d and an empty prefix's (m - base) * Z are zeroed
    dm = tl.where(m == float("-inf"), 0.0, m - base)
    t = (t + dm * z) * c + tl.sum(tl.where(a > float("-inf"), e * d, 0.0), 0)
    z = z * c + tl.sum(e, 0)
    return m_new, z, t


@triton.jit
def _stats_merge(m, z, t):
    """Merge per-chunk ``(m, Z, T)`` vectors (masked lanes: ``(-inf, 0, 0)``)."""
    m_all = tl.max(m, 0)
    base = tl.where(m_all == float("-inf"), 0.0, m_all)
    c = tl.exp(m - base)
    dm = tl.where(m == float("-inf"), 0.0, m - base)
    return m_all, tl.sum(z * c, 0), tl.sum((t + dm * z) * c, 0)


@triton.jit
def _rule(m, z, t, alpha, log_v, gate_lo, gate_width, GATE: tl.constexpr):
    """``(alpha * gate, lse(a) - log V)`` of a row from its ``(m, Z, T)``; a row with no
    finite assistant logit has KL 0 (``kl_from_uniform``) and a shift of -inf."""
    log_z = tl.log(z)
    if GATE:
        kl = tl.where(m > float("-inf"), log_v + t / z - log_z, 0.0)
        alpha = alpha * tl.minimum(tl.maximum((kl - gate_lo) / gate_width, 0.0), 1.0)
    return alpha, m + log_z - log_v


@triton.jit
def _row_stats(a_row, lo, hi, BLOCK: tl.constexpr):
    """``(m, Z, T)`` of the assistant's tokens ``[lo, hi)``."""
    m = tl.full((), float("-inf"), tl.float32)
    z = tl.zeros((), tl.float32)
    t = tl.zeros((), tl.float32)
    for start in range(lo, hi, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        a = tl.load(a_row + offs, mask=offs < hi, other=float("-inf")).to(tl.float32)
        m, z, t = _stats_step(m, z, t, a)
    return m, z, t


@triton.jit
def _merge_rule(stats_ptr, rule_ptr, alpha_ptr, row, B, S, log_v, gate_lo, gate_width,
                GATE: tl.constexpr, S_BLOCK: tl.constexpr):
    """Split-row: the row's last program merges the chunks' ``(m, Z, T)`` in ``stats`` and
    writes the row's effective alpha to ``rule[row]`` and its shift to ``rule[B + row]``."""
    j = tl.arange(0, S_BLOCK)
    part = stats_ptr + (row * S + j) * 3
    ok = j < S
    m, z, t = _stats_merge(tl.load(part, mask=ok, other=float("-inf"), cache_modifier=".cg"),
                           tl.load(part + 1, mask=ok, other=0.0, cache_modifier=".cg"),
                           tl.load(part + 2, mask=ok, other=0.0, cache_modifier=".cg"))
    alpha, shift = _rule(m, z, t, tl.load(alpha_ptr + row), log_v, gate_lo, gate_width, GATE)
    tl.store(rule_ptr + row, alpha)
    tl.store(rule_ptr + B + row, shift)


@triton.jit
def _split_stats_kernel(a_ptr, stride_a, V, CHUNK, S, B, alpha_ptr, stats_ptr, ticket_ptr,
                        rule_ptr, log_v, gate_lo, gate_width, GATE: tl.constexpr,
                        BLOCK: tl.constexpr, S_BLOCK: tl.constexpr):
    """Split-row rule parameters where no selection pass reads the row first (sampling with
    ``r == 0``): each chunk's ``(m, Z, T)``, merged by the row's last program."""
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    lo = chunk * CHUNK
    m, z, t = _row_stats(a_ptr + row * stride_a, lo, tl.minimum(lo + CHUNK, V), BLOCK)
    part = stats_ptr + (row * S + chunk) * 3
    tl.store(part, m)
    tl.store(part + 1, z)
    tl.store(part + 2, t)
    tl.debug_barrier()
    ticket = tl.atomic_add(ticket_ptr + row, 1, sem="acq_rel")
    if ticket == S - 1:
        _merge_rule(stats_ptr, rule_ptr, alpha_ptr, row, B, S, log_v, gate_lo, gate_width,
                    GATE, S_BLOCK)


# --- split-row selection: several programs per row --------------------------------------------
#
# One launch per radix pass over a [B, S] grid (row, chunk). Each program histograms the key
# digit of its chunk and adds it into the row's merged histogram with integer atomics (exact,
# order-free); the last program of the row to finish (an atomic ticket) picks the digit from
# the merged histogram and writes the row's state for the next launch:
#   state[row] = (prefix bits, k_rem, active, value bits)
# where ``value`` is ``max + ln r`` while the selection runs and the final threshold once it
# stops (``active`` 0). A pass finds an inactive row and returns at once, so rows the ratio
# test decides early cost nothing more, and the launcher runs only the passes the input dtype
# needs (``key_passes``).

STATE_WORDS = tl.constexpr(4)


@triton.jit
def _complete_key(prefix, NPASS: tl.constexpr):
    """Key of the selected value once ``NPASS`` digits are known and the rest are known zero
    in the value's bits (bf16/fp16 inputs): a negative's key has those bits set."""
    if NPASS < 4:
        low = tl.full((), (1 << (32 - 8 * NPASS)) - 1, tl.uint32)
        prefix = tl.where(prefix >= 0x80000000, prefix, prefix | low)
    return prefix


@triton.jit
def _split_pass_kernel(l_ptr, a_ptr, stride_l, stride_a, V, CHUNK, S, B, k, top_k_ptr, ln_r,
                       thr_ptr, alpha_ptr, shift_ptr, hist_ptr, ticket_ptr, pmax_ptr,
                       state_ptr, stats_ptr, rule_ptr, log_v, gate_lo, gate_width,
                       PASS: tl.constexpr, NPASS: tl.constexpr, ON_SCORES: tl.constexpr,
                       STATS: tl.constexpr, GATE: tl.constexpr, ABOVE_UNIFORM: tl.constexpr,
                       BLOCK: tl.constexpr, S_BLOCK: tl.constexpr):
    """Radix pass ``PASS`` (key bits [24 - 8 PASS, 32 - 8 PASS)) of chunk ``program_id(1)``.

    ``ON_SCORES=False``: the plausibility threshold ``min(kth_largest(l, k), max(l) + ln r)``
    (pass 0 also reduces the row max and, with ``STATS``, the assistant's ``(m, Z, T)``, from
    which the row's last program writes the rule (``_merge_rule``) given the base
    ``alpha_ptr``). ``ON_SCORES=True``: the ``top_k``-th largest score (per-row ``top_k``, off
    unless ``0 < top_k < V``), given the filter threshold in ``thr_ptr`` (a state array:
    value bits at word 3) and the rule (effective ``alpha_ptr``, ``shift_ptr``).
    """
    SHIFT: tl.constexpr = 24 - 8 * PASS
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    state = state_ptr + row * STATE_WORDS
    shift = ln_r  # unused unless ABOVE_UNIFORM scores are loaded
    if ON_SCORES:
        thr = tl.load(thr_ptr + row * STATE_WORDS + 3).to(tl.float32, bitcast=True)
        alpha = tl.load(alpha_ptr + row)
        if ABOVE_UNIFORM:
            shift = tl.load(shift_ptr + row)
    else:
        thr = ln_r  # unused by the loads when ON_SCORES is False
        alpha = ln_r
    if PASS == 0:
        prefix = tl.zeros((), tl.uint32)
        if ON_SCORES:
            k_rem = tl.load(top_k_ptr + row)
            active = (k_rem > 0) & (k_rem < V)
            if (chunk == 0) & ~active:
                tl.store(state + 3, tl.full((), float("-inf"), tl.float32).to(
                    tl.int32, bitcast=True))
        else:
            k_rem = tl.full((), k, tl.int32)
            active = k_rem > 0
    else:
        prefix = tl.load(state).to(tl.uint32, bitcast=True)
        k_rem = tl.load(state + 1)
        active = tl.load(state + 2) != 0
    if active:
        l_row = l_ptr + row * stride_l
        a_row = a_ptr + row * stride_a
        hist = tl.zeros((NBINS,), tl.int32)
        m = tl.full((), float("-inf"), tl.float32)
        m_a = tl.full((), float("-inf"), tl.float32)
        z_a = tl.zeros((), tl.float32)
        t_a = tl.zeros((), tl.float32)
        lo = chunk * CHUNK
        hi = tl.minimum(lo + CHUNK, V)  # chunks need not be whole blocks
        for start in range(lo, hi, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            inb = offs < hi
            x = _load_values(l_row, a_row, offs, inb, thr, alpha, shift, ON_SCORES,
                             ABOVE_UNIFORM)
            if PASS == 0:
                if not ON_SCORES:
                    m = tl.maximum(m, tl.max(x, 0))
                    if STATS:
                        a = tl.load(a_row + offs, mask=inb, other=float("-inf")).to(tl.float32)
                        m_a, z_a, t_a = _stats_step(m_a, z_a, t_a, a)
            key = _to_key(x)
            if PASS > 0:
                inb = inb & ((key >> (SHIFT + DIGIT_BITS)) == (prefix >> (SHIFT + DIGIT_BITS)))
            hist += tl.histogram(((key >> SHIFT) & 0xFF).to(tl.int32), NBINS, mask=inb)
        bins = tl.arange(0, NBINS)
        hrow = hist_ptr + (row * NPASS + PASS) * NBINS + bins
        tl.atomic_add(hrow, hist, mask=hist != 0, sem="relaxed")
        if PASS == 0:
            if not ON_SCORES:
                tl.store(pmax_ptr + row * S + chunk, m)
                if STATS:
                    part = stats_ptr + (row * S + chunk) * 3
                    tl.store(part, m_a)
                    tl.store(part + 1, z_a)
                    tl.store(part + 2, t_a)
        # every thread's histogram atomics and the max store come before the ticket
        tl.debug_barrier()
        ticket = tl.atomic_add(ticket_ptr + row * NPASS + PASS, 1, sem="acq_rel")
        if ticket == S - 1:  # the row's last program: all of its chunks are merged
            hist = tl.load(hrow, cache_modifier=".cg")
            prefix, k_rem = _pick_digit(hist, k_rem, prefix, SHIFT)
            if ON_SCORES:
                more = PASS + 1 < NPASS
                value = _from_key(prefix)
            else:
                if PASS == 0:
                    j = tl.arange(0, S_BLOCK)
                    pm = tl.load(pmax_ptr + row * S + j, mask=j < S, other=float("-inf"),
                                 cache_modifier=".cg")
                    ratio_thr = tl.max(pm, 0) + ln_r
                    if STATS:
                        _merge_rule(stats_ptr, rule_ptr, alpha_ptr, row, B, S, log_v, gate_lo,
                                    gate_width, GATE, S_BLOCK)
                else:
                    ratio_thr = tl.load(state + 3).to(tl.float32, bitcast=True)
                # stop once the prefix proves the k-th largest lies above max + ln r (the
                # ratio test decides alone), or when the dtype's passes are done
                more = (prefix <= _to_key(ratio_thr)) & (PASS + 1 < NPASS)
                value = tl.where(more, ratio_thr,
                                 tl.minimum(_from_key(_complete_key(prefix, NPASS)), ratio_thr))
            tl.store(state, prefix.to(tl.int32, bitcast=True))
            tl.store(state + 1, k_rem)
            tl.store(state + 2, more.to(tl.int32))
            tl.store(state + 3, value.to(tl.int32, bitcast=True))


def key_passes(dtype) -> int:
    """Radix passes that determine an fp32 key exactly for values of ``dtype``: an fp32 key has
    32 bits, but a bf16 value's low 16 and an fp16 value's low 13 are zero."""
    return {torch.bfloat16: 2, torch.float16: 3}.get(dtype, 4)


def split_select(target, assistant, *, S, chunk, block, k=0, ln_r=0.0, top_k=None, thr=None,
                 alpha=None, shift=None, rule=None, launch_kw=None):
    """Per-row state ``[B, 4]`` int32 of a split-row selection; word 3 holds the result's bits.

    Without ``top_k``: the plausibility threshold of ``target`` (``k``, ``ln_r``); with a
    ``Rule`` that needs the assistant's statistics, pass 0 also writes ``rule_out`` (float32
    ``[2, B]``: the effective alpha from ``alpha``, the shift), returned after the state. With
    ``top_k`` (int32 ``[B]``): the top_k-th largest generate-mode score, given the filter
    state ``thr``, the effective ``alpha`` and ``shift``. No host synchronisation: every
    launch reads the state the previous one left on the device.
    """
    B, V = target.shape
    dev = target.device
    on_scores = top_k is not None
    rule = rule or Rule("logit", None, V)
    stats = rule.stats and not on_scores
    if stats and alpha is None:
        raise ValueError("the rule's statistics need the base alpha")
    npass = 4 if on_scores else key_passes(target.dtype)
    ws = torch.zeros(B * (npass * NBINS.value + npass + STATE_WORDS.value), device=dev,
                     dtype=torch.int32)
    hist = ws[:B * npass * NBINS.value]
    ticket = ws[B * npass * NBINS.value:B * npass * (NBINS.value + 1)]
    state = ws[B * npass * (NBINS.value + 1):].view(B, STATE_WORDS.value)
    pmax = torch.empty((B, S), device=dev, dtype=torch.float32)
    part = rule_out = pmax
    if stats:
        part = torch.empty((B, S, 3), device=dev, dtype=torch.float32)
        rule_out = torch.empty((2, B), device=dev, dtype=torch.float32)
    dummy_i = ticket if top_k is None else top_k
    args = (target, assistant, target.stride(0), assistant.stride(0), V, chunk, S, B, k,
            dummy_i, ln_r, state if thr is None else thr, pmax if alpha is None else alpha,
            pmax if shift is None else shift, hist, ticket, pmax, state, part, rule_out,
            *rule.scalars)
    for p in range(npass):
        _split_pass_kernel[(B, S)](*args, PASS=p, NPASS=npass, ON_SCORES=on_scores,
                                   STATS=stats, GATE=rule.gate,
                                   ABOVE_UNIFORM=rule.above_uniform, BLOCK=block,
                                   S_BLOCK=triton.next_power_of_2(S), **(launch_kw or {}))
    return (state, rule_out) if stats else state


def split_rule(assistant, alpha, rule, *, S, chunk, block, launch_kw=None):
    """Split-row rule ``[2, B]`` (effective alpha, shift) by its own launch, for callers with
    no threshold selection to fuse it into."""
    B, V = assistant.shape
    dev = assistant.device
    part = torch.empty((B, S, 3), device=dev, dtype=torch.float32)
    ticket = torch.zeros((B,), device=dev, dtype=torch.int32)
    rule_out = torch.empty((2, B), device=dev, dtype=torch.float32)
    _split_stats_kernel[(B, S)](assistant, assistant.stride(0), V, chunk, S, B, alpha, part,
                                ticket, rule_out, *rule.scalars, GATE=rule.gate, BLOCK=block,
                                S_BLOCK=triton.next_power_of_2(S), **(launch_kw or {}))
    return rule_out
