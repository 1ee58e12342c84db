"""Shared device helpers: the ULD score of a token and an exact k-th-largest selection.

The plausibility filter needs ``kth_largest(l, k)`` per row with ``k = floor(r * V)`` (about
1.3k-15k of 128k). A sort reads and writes the row ~log(V) times; instead the row is reduced
to a radix select over order-preserving ``uint32`` keys of its fp32 values: four passes, each
a 256-bin histogram of the next 8 key bits among the elements that still match the prefix
found so far. The result is the exact bit pattern of the k-th largest value, so thresholds
(and hence greedy token ids) equal the torch reference bit for bit. The first pass is fused
with the row max by the caller, and the later passes are skipped as soon as the prefix proves
that the k-th largest value lies above ``max + ln r`` (then the ratio test decides alone).
One program owns one row, so the repeated passes over it are meant to hit L2 rather than
HBM (a 152k-token bf16 row is 300 KB); whether they do at large B is what the benchmark shows.
"""

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
             ON_SCORES: tl.constexpr, BLOCK: tl.constexpr):
    """Key of the k-th largest value of a row (1 <= k <= V), given the histogram of its top
    8 key bits. Stops early, returning a partial key above ``floor_key``, once the k-th
    largest value is known to exceed ``floor_key`` (the caller only needs ``min`` with it).
    """
    prefix, k_rem = _pick_digit(hist, k, tl.zeros((), tl.uint32), 24)
    for p in tl.static_range(1, 4):
        if prefix <= floor_key:
            hist = _hist_pass(l_row, a_row, V, prefix, thr, alpha, 24 - 8 * p, ON_SCORES, BLOCK)
            prefix, k_rem = _pick_digit(hist, k_rem, prefix, 24 - 8 * p)
    return prefix


@triton.jit
def _row_threshold(l_row, V, k, ln_r, BLOCK: tl.constexpr):
    """``min(kth_largest(l, k), max(l) + ln r)`` of one row, bit-exact to the torch reference."""
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
                   False, BLOCK)
    return tl.minimum(_from_key(key), ratio_thr)


@triton.jit
def _score_floor(l_row, a_row, V, top_k, thr, alpha, BLOCK: tl.constexpr):
    """The top_k-th largest generate-mode score of a row (ties at it are all kept)."""
    hist = _hist_pass(l_row, a_row, V, tl.zeros((), tl.uint32), thr, alpha, 24, True, BLOCK)
    never = tl.full((), 0xFFFFFFFF, tl.uint32)
    return _from_key(_kth_key(l_row, a_row, V, top_k, hist, never, thr, alpha, True, BLOCK))
