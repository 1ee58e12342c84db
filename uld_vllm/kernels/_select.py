"""Shared device helpers: the ULD score of a token and an exact k-th-largest selection.

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
def _scores(l, a, thr, alpha, SCORE_MODE: tl.constexpr):
    """ULD score of each token given the row threshold (``uld_logits`` semantics).

    ``thr = -inf`` gives the unfiltered rule (every finite target logit kept).
    """
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
def _load_values(l_row, a_row, offs, inb, thr, alpha, ON_SCORES: tl.constexpr):
    x = tl.load(l_row + offs, mask=inb, other=float("-inf")).to(tl.float32)
    if ON_SCORES:
        a = tl.load(a_row + offs, mask=inb, other=0.0).to(tl.float32)
        x = _scores(x, a, thr, alpha, False)
    return x


@triton.jit
def _hist_pass(l_row, a_row, V, prefix, thr, alpha, SHIFT: tl.constexpr,
               ON_SCORES: tl.constexpr, BLOCK: tl.constexpr):
    """Histogram of key bits [SHIFT, SHIFT+8) among elements whose higher bits equal prefix's."""
    hist = tl.zeros((NBINS,), tl.int32)
    for start in range(0, V, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        inb = offs < V
        key = _to_key(_load_values(l_row, a_row, offs, inb, thr, alpha, ON_SCORES))
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
def _kth_key(l_row, a_row, V, k, hist, floor_key, thr, alpha,
             ON_SCORES: tl.constexpr, BLOCK: tl.constexpr, NPASS: tl.constexpr):
    """Key of the k-th largest value of a row (1 <= k <= V), given the histogram of its top
    8 key bits. Stops early, returning a partial key above ``floor_key``, once the k-th
    largest value is known to exceed ``floor_key`` (the caller only needs ``min`` with it).
    """
    prefix, k_rem = _pick_digit(hist, k, tl.zeros((), tl.uint32), 24)
    for p in tl.static_range(1, NPASS):
        if prefix <= floor_key:
            hist = _hist_pass(l_row, a_row, V, prefix, thr, alpha, 24 - 8 * p, ON_SCORES, BLOCK)
            prefix, k_rem = _pick_digit(hist, k_rem, prefix, 24 - 8 * p)
    return _complete_key(prefix, NPASS)


@triton.jit
def _row_threshold(l_row, V, k, ln_r, BLOCK: tl.constexpr, NPASS: tl.constexpr):
    """``min(kth_largest(l, k), max(l) + ln r)`` of one row, bit-exact to the torch reference.
    ``NPASS``: radix passes the target's dtype needs (``key_passes``)."""
    m = tl.full((), float("-inf"), tl.float32)
    hist = tl.zeros((NBINS,), tl.int32)
    for start in range(0, V, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        inb = offs < V
        l = tl.load(l_row + offs, mask=inb, other=float("-inf")).to(tl.float32)
        m = tl.maximum(m, tl.max(l, 0))
        hist += tl.histogram((_to_key(l) >> 24).to(tl.int32), NBINS, mask=inb)
    ratio_thr = m + ln_r
    key = _kth_key(l_row, l_row, V, k, hist, _to_key(ratio_thr), ratio_thr, ratio_thr,
                   False, BLOCK, NPASS)
    return tl.minimum(_from_key(key), ratio_thr)


@triton.jit
def _score_floor(l_row, a_row, V, top_k, thr, alpha, BLOCK: tl.constexpr):
    """The top_k-th largest generate-mode score of a row (ties at it are all kept)."""
    hist = _hist_pass(l_row, a_row, V, tl.zeros((), tl.uint32), thr, alpha, 24, True, BLOCK)
    never = tl.full((), 0xFFFFFFFF, tl.uint32)
    return _from_key(_kth_key(l_row, a_row, V, top_k, hist, never, thr, alpha, True, BLOCK, 4))


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
def _split_pass_kernel(l_ptr, a_ptr, stride_l, stride_a, V, CHUNK, S, k, top_k_ptr, ln_r,
                       thr_ptr, alpha_ptr, hist_ptr, ticket_ptr, pmax_ptr, state_ptr,
                       PASS: tl.constexpr, NPASS: tl.constexpr, ON_SCORES: tl.constexpr,
                       BLOCK: tl.constexpr, S_BLOCK: tl.constexpr):
    """Radix pass ``PASS`` (key bits [24 - 8 PASS, 32 - 8 PASS)) of chunk ``program_id(1)``.

    ``ON_SCORES=False``: the plausibility threshold ``min(kth_largest(l, k), max(l) + ln r)``
    (pass 0 also reduces the row max). ``ON_SCORES=True``: the ``top_k``-th largest score
    (per-row ``top_k``, off unless ``0 < top_k < V``), given the filter threshold in
    ``thr_ptr`` (a state array: value bits at word 3).
    """
    SHIFT: tl.constexpr = 24 - 8 * PASS
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    state = state_ptr + row * STATE_WORDS
    if ON_SCORES:
        thr = tl.load(thr_ptr + row * STATE_WORDS + 3).to(tl.float32, bitcast=True)
        alpha = tl.load(alpha_ptr + row)
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
        lo = chunk * CHUNK
        hi = tl.minimum(lo + CHUNK, V)  # chunks need not be whole blocks
        for start in range(lo, hi, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            inb = offs < hi
            x = _load_values(l_row, a_row, offs, inb, thr, alpha, ON_SCORES)
            if PASS == 0:
                if not ON_SCORES:
                    m = tl.maximum(m, tl.max(x, 0))
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
                 alpha=None, launch_kw=None):
    """Per-row state ``[B, 4]`` int32 of a split-row selection; word 3 holds the result's bits.

    Without ``top_k``: the plausibility threshold of ``target`` (``k``, ``ln_r``). With
    ``top_k`` (int32 ``[B]``): the top_k-th largest generate-mode score, given the filter
    state ``thr`` and ``alpha``. No host synchronisation: every launch reads the state the
    previous one left on the device.
    """
    B, V = target.shape
    dev = target.device
    on_scores = top_k is not None
    npass = 4 if on_scores else key_passes(target.dtype)
    ws = torch.zeros(B * (npass * NBINS.value + npass + STATE_WORDS.value), device=dev,
                     dtype=torch.int32)
    hist = ws[:B * npass * NBINS.value]
    ticket = ws[B * npass * NBINS.value:B * npass * (NBINS.value + 1)]
    state = ws[B * npass * (NBINS.value + 1):].view(B, STATE_WORDS.value)
    pmax = torch.empty((B, S), device=dev, dtype=torch.float32)
    dummy_i = ticket if top_k is None else top_k
    args = (target, assistant, target.stride(0), assistant.stride(0), V, chunk, S, k, dummy_i,
            ln_r, state if thr is None else thr, pmax if alpha is None else alpha, hist, ticket,
            pmax, state)
    for p in range(npass):
        _split_pass_kernel[(B, S)](*args, PASS=p, NPASS=npass, ON_SCORES=on_scores,
                                   BLOCK=block, S_BLOCK=triton.next_power_of_2(S),
                                   **(launch_kw or {}))
    return state
