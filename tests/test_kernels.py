"""The fused Triton kernels (uld_vllm.kernels) against the torch reference ``uld_logits``.

Runs on CPU in the Triton interpreter: TRITON_INTERPRET must be set before triton is first
imported (the flag is read when kernels are decorated). With ``ULD_KERNEL_TEST_DEVICE=cuda``
(what ``make gpu-check`` sets) the same tests run the compiled kernels on a GPU instead. Shapes
are small because the interpreter pays per op; a separate test compiles every kernel for sm_90
(no GPU needed) so code that only the interpreter accepts cannot slip through. Both launch
variants (one program per row, split-row) are tested, each call asserting which one ran.
"""

import os
import sys

ON_GPU = os.environ.get("ULD_KERNEL_TEST_DEVICE", "cpu") == "cuda"
DEV = "cuda" if ON_GPU else "cpu"
_PREV_INTERPRET = os.environ.get("TRITON_INTERPRET")
_TRITON_WAS_IMPORTED = "triton" in sys.modules
if not ON_GPU:
    os.environ["TRITON_INTERPRET"] = "1"

import math  # noqa: E402
import subprocess  # noqa: E402
import textwrap  # noqa: E402
from types import SimpleNamespace  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import triton  # noqa: E402

from uld_vllm import kernels  # noqa: E402
from uld_vllm.core.logits import confidence_gate, uld_logits  # noqa: E402
from uld_vllm.engine import combine  # noqa: E402
from uld_vllm.errors import UldError  # noqa: E402

uld_combine, uld_sample = kernels.uld_combine, kernels.uld_sample
# whether the kernels can be tested in this process (else: test_kernels_fresh.py)
IN_PROCESS = ON_GPU or (not _TRITON_WAS_IMPORTED and kernels.INTERPRETED)



def _restore_interpret():
    if _PREV_INTERPRET is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = _PREV_INTERPRET


# the rest of a pytest session (vLLM engine tests) runs with the caller's setting; Triton
# still reads the flag lazily (e.g. on first launch), so it is set again around these tests
_restore_interpret()


@pytest.fixture(autouse=True, scope="module")
def _interpret():
    if not ON_GPU:
        os.environ["TRITON_INTERPRET"] = "1"
    yield
    _restore_interpret()

pytestmark = [
    pytest.mark.skipif(ON_GPU and not torch.cuda.is_available(),
                       reason="ULD_KERNEL_TEST_DEVICE=cuda but no CUDA device"),
    # not silent: tests/test_kernels_fresh.py then runs this module in a fresh interpreter
    pytest.mark.skipif(
        not IN_PROCESS,
        reason="triton was imported before this module could set TRITON_INTERPRET=1; "
               "tests/test_kernels_fresh.py runs this module in a fresh process instead"),
    # the Triton interpreter pays per op, so the module is slow (make test-fast skips it)
    pytest.mark.slow,
    # numpy's view of the kernels' deliberate -inf arithmetic (log 0, -inf - -inf, masked)
    pytest.mark.filterwarnings("ignore::RuntimeWarning"),
]

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
NEG_INF = float("-inf")
# r == 0 goes through two log-sum-exps whose summation order differs from torch's; with
# r > 0 the interpreted kernel does the reference's fp32 operations and must be exact. The
# compiled kernel contracts l - alpha * a into one fma where torch's CUDA ops round the
# product first (measured on an H200: masks identical, ~90% of values bit-identical, the rest
# within 2e-6), so on GPU the values are compared within TOL and exactness is left to the
# greedy-id tests.
EXACT = not ON_GPU
TOL = {F32: dict(atol=2e-5, rtol=1e-5), BF16: dict(atol=2e-5, rtol=1e-5),
       F16: dict(atol=2e-5, rtol=1e-5)}


def make_logits(B, V, dtype=F32, *, seed=0, ties=False, neg_inf=False):
    """Rows cycle flat / medium / peaky, so the ratio test, the top-k floor and a mix of both
    decide the threshold. ``ties``: values on a 0.25 grid (many ties at the k-th place).
    ``neg_inf``: scattered -inf in both; row 0 all -inf, row 1 with fewer than k finite
    target logits, row 2 with a -inf assistant logit on its most likely token."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.tensor([0.05, 0.7, 3.0])[torch.arange(B) % 3].unsqueeze(1)
    l = torch.randn(B, V, generator=g) * scale
    a = torch.randn(B, V, generator=g) * 2
    if ties:
        l, a = (l * 4).round() / 4, (a * 4).round() / 4
    if neg_inf:
        l[torch.rand(B, V, generator=g) < 0.05] = NEG_INF
        a[torch.rand(B, V, generator=g) < 0.05] = NEG_INF
        l[0] = NEG_INF
        if B > 2:
            l[1, 3:] = NEG_INF
            a[2, l[2].argmax()] = NEG_INF
    return l.to(DEV, dtype), a.to(DEV, dtype)


def row_alpha(B, kind):
    if kind == "float":
        return 0.8
    alpha = torch.linspace(0.1, 1.5, B)
    if B > 2:  # alpha == 0 ignores the assistant, its -inf too (row 2: -inf on the top token)
        alpha[2] = 0.0
    return alpha.to(DEV)


def assert_logits_match(got, want, dtype, exact):
    assert got.dtype == F32 and got.shape == want.shape
    assert torch.equal(got == NEG_INF, want == NEG_INF), "masks differ"
    fin = want != NEG_INF
    if exact:
        assert torch.equal(got[fin], want[fin])
    else:
        torch.testing.assert_close(got[fin], want[fin], **TOL[dtype])


# (B, V, r, dtype, mode, ties, neg_inf, alpha)
CASES = [
    (1, 1271, 0.1, F32, "generate", False, False, "float"),
    (7, 1271, 0.01, BF16, "score", True, False, "row"),
    (41, 1271, 0.1, F16, "generate", False, True, "row"),
    (7, 4099, 0.1, F32, "score", False, True, "row"),
    (7, 4099, 0.01, BF16, "generate", True, True, "row"),
    (41, 4099, 0.01, F32, "generate", True, False, "row"),
    (1, 32000, 0.01, BF16, "generate", False, False, "float"),
    (1, 32000, 0.1, F16, "score", True, True, "row"),
    (7, 1271, 0.0, F32, "generate", False, True, "row"),
    (7, 4099, 0.0, BF16, "score", True, False, "float"),
    (1, 32000, 0.0, F16, "generate", False, False, "row"),
]


def case_id(c):
    B, V, r, dtype, mode, ties, neg_inf, alpha = c
    return (f"B{B}-V{V}-r{r}-{str(dtype)[6:]}-{mode}-{alpha}"
            + ("-ties" if ties else "") + ("-inf" if neg_inf else ""))


# the launch variants every reference case runs in: one program per row, and split-row with
# three programs per row (chunks of 432 / 1376 / 10672 tokens for V = 1271 / 4099 / 32000:
# none a whole number of loop steps, six steps per chunk at V = 32000)
VARIANTS = {"row": False, "split3": 3}


class launched:
    """Counts the variants ``op`` launched with inside the block, so a test can assert that
    the split path really ran (a silent fallback to one program per row would still pass)."""

    def __init__(self, op):
        self.op = op

    def __enter__(self):
        self.before = dict(kernels.LAUNCHES)
        return self

    def __exit__(self, *exc):
        self.counts = {v: kernels.LAUNCHES[self.op, v] - self.before.get((self.op, v), 0)
                       for v in ("row", "split")}

    def only(self, variant):
        other = "row" if variant == "split" else "split"
        return self.counts[variant] > 0 and self.counts[other] == 0


def variant_name(split):
    return "row" if split is False else "split"


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_combined_logits_match_reference(case, variant):
    B, V, r, dtype, mode, ties, neg_inf, alpha = case
    l, a = make_logits(B, V, dtype, seed=V + B, ties=ties, neg_inf=neg_inf)
    alpha = row_alpha(B, alpha)
    with launched("combine") as n:
        got = uld_combine(l, a, alpha=alpha, filter_ratio=r, mode=mode, split=VARIANTS[variant])
    assert n.only(variant_name(VARIANTS[variant]))
    want = uld_logits(l, a, alpha=alpha, filter_ratio=r, mode=mode)
    assert_logits_match(got, want, dtype, exact=EXACT and r > 0)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("case", [c for c in CASES if c[4] == "generate" or c[2] == 0.0],
                         ids=case_id)
def test_greedy_ids_equal_reference_argmax(case, variant):
    B, V, r, dtype, _, ties, neg_inf, alpha = case
    l, a = make_logits(B, V, dtype, seed=V + B + 1, ties=ties, neg_inf=neg_inf)
    alpha = row_alpha(B, alpha)
    ref = uld_logits(l.float(), a.float(), alpha=alpha, filter_ratio=r)
    # duplicate each row's winner half a row away: an exact tie, often across chunks, that
    # the first index must win (as torch.argmax)
    l, a = l.clone(), a.clone()
    win = ref.argmax(-1)
    rows = torch.arange(B, device=DEV)
    l[rows, (win + V // 2) % V] = l[rows, win]
    a[rows, (win + V // 2) % V] = a[rows, win]
    want = uld_logits(l, a, alpha=alpha, filter_ratio=r).argmax(-1)
    with launched("sample") as n:
        got = uld_sample(l, a, alpha=alpha, filter_ratio=r, temperature=0.0,
                         split=VARIANTS[variant])
    assert n.only(variant_name(VARIANTS[variant]))
    assert got.dtype == torch.int64
    assert torch.equal(got, want)


# split-row on its own shapes: (B, V, r, dtype, mode, ties, neg_inf, alpha, split)
SPLIT_CASES = [
    (1, 1271, 0.1, F32, "generate", True, False, "float", 5),  # B = 1: 5 chunks of 256
    (3, 4099, 0.01, BF16, "generate", False, True, "row", 4),  # -inf rows; bf16: 2 passes
    (5, 999, 0.05, F16, "score", True, True, "row", 7),  # ties at the k-th; fp16: 3 passes
    (6, 1500, 0.3, F32, "generate", True, True, "row", 3),  # large k: all four passes
    (2, 4099, 0.1, F32, "score", True, False, "row", 1),  # forced split with one program
    (4, 333, 0.0, BF16, "generate", False, True, "row", 6),  # r = 0: merged log-sum-exps
    (1, 32000, 0.01, F32, "generate", False, False, "float", None),  # auto: 32 programs/row
]


def split_id(c):
    return case_id(c[:8]) + f"-S{c[8]}"


@pytest.mark.parametrize("case", SPLIT_CASES, ids=split_id)
def test_split_row_matches_reference(case):
    """Split-row logits and greedy ids against the reference, and the split path was taken."""
    B, V, r, dtype, mode, ties, neg_inf, alpha, split = case
    plan = kernels.split_plan(B, V, torch.device(DEV), split)
    assert plan is not None and plan[0] * plan[1] >= V > (plan[0] - 1) * plan[1]
    assert split is None or plan[0] == split
    l, a = make_logits(B, V, dtype, seed=V + 3 * B, ties=ties, neg_inf=neg_inf)
    alpha = row_alpha(B, alpha)
    with launched("combine") as n:
        got = uld_combine(l, a, alpha=alpha, filter_ratio=r, mode=mode, split=split)
    assert n.only("split")
    want = uld_logits(l, a, alpha=alpha, filter_ratio=r, mode=mode)
    assert_logits_match(got, want, dtype, exact=EXACT and r > 0)
    # greedy: each row's winner copied into the last chunk, a tie the first index must win
    ref = uld_logits(l, a, alpha=alpha, filter_ratio=r)
    rows = torch.arange(B, device=DEV)
    l, a = l.clone(), a.clone()
    win = ref.argmax(-1)
    l[rows, V - 1], a[rows, V - 1] = l[rows, win], a[rows, win]
    with launched("sample") as n:
        ids = uld_sample(l, a, alpha=alpha, filter_ratio=r, split=split)
    assert n.only("split")
    assert torch.equal(ids, uld_logits(l, a, alpha=alpha, filter_ratio=r).argmax(-1))


@pytest.mark.parametrize("dtype", [BF16, F16])
def test_fewer_radix_passes_exact_on_negative_thresholds(dtype):
    """bf16/fp16 targets stop the radix select after 2/3 passes (the key's remaining bits are
    known: zero for a positive value, set for a negative one); masks stay exact when the k-th
    largest value is negative and tied."""
    g = torch.Generator().manual_seed(21)
    l = (-(torch.randn(3, 999, generator=g).abs() * 3) - 1).to(DEV, dtype)
    l[1, ::7] = l[1, 500]  # many ties, one of them likely at the k-th place
    a = torch.randn(3, 999, generator=g).to(DEV, dtype)
    want = uld_logits(l, a, alpha=0.7, filter_ratio=0.5, mode="score")
    kth = l.float().topk(499, dim=-1).values[:, -1]
    assert bool((kth < 0).all()) and bool((kth < l.float().max(-1).values - 0.7).all())
    for split in (False, 3):
        got = uld_combine(l, a, alpha=0.7, filter_ratio=0.5, mode="score", split=split)
        assert_logits_match(got, want, dtype, EXACT)
        assert torch.equal(uld_sample(l, a, alpha=0.7, filter_ratio=0.5, split=split),
                           uld_logits(l, a, alpha=0.7, filter_ratio=0.5).argmax(-1))


def test_split_row_samples_the_same_draws():
    """Sampling, top-k (per row: off, 1, 3, V = off, 50) and the -inf rules: the split variant
    draws exactly the ids of one program per row (the noise depends on seed and token only)."""
    B, V = 5, 1271
    l, a = make_logits(B, V, BF16, seed=12, ties=True, neg_inf=True)
    top_k = torch.tensor([0, 1, 3, V, 50], device=DEV)
    alpha = row_alpha(B, "row")
    for r, temperature, k in ((0.1, 0.8, top_k), (0.0, 1.5, None), (0.01, 0.0, top_k)):
        kw = dict(alpha=alpha, filter_ratio=r, temperature=temperature, seeds=9, top_k=k)
        with launched("sample") as n:
            got = uld_sample(l, a, split=4, **kw)
        assert n.only("split")
        assert torch.equal(got, uld_sample(l, a, split=False, **kw))
    ref = uld_logits(l, a, alpha=alpha, filter_ratio=0.1)
    ids = uld_sample(l, a, alpha=alpha, filter_ratio=0.1, temperature=3.0, seeds=4,
                     top_k=top_k, split=4)
    assert ids[0] == 0  # row 0 is all -inf
    third = ref.topk(3, dim=-1).values[:, -1]
    assert ids[1] == ref[1].argmax() and ref[2, ids[2]] >= third[2]


def test_split_plan_heuristic():
    cpu = torch.device("cpu")  # decides as a 132-SM GPU (H100/H200), see _utils.sm_count
    assert kernels.split_plan(1, 32000, cpu) == (32, 1024, 1024)
    assert kernels.split_plan(32, 128256, cpu) == (33, 3888, 2048)
    assert kernels.split_plan(256, 151936, cpu) == (4, 37984, 2048)
    assert kernels.split_plan(528, 151936, cpu)[0] == 2
    assert kernels.split_plan(529, 151936, cpu) is None  # the batch alone fills the GPU
    assert kernels.split_plan(1, 1000, cpu) is None  # one block: nothing to split
    assert kernels.split_plan(1, 32000, cpu, False) is None
    assert kernels.split_plan(4096, 32000, cpu, True)[0] == 1  # forced: still the split path
    assert kernels.split_plan(3, 4099, cpu, 4) == (4, 1040, 2048)  # the count asked for
    assert kernels.split_plan(1, 100, cpu, 64) == (7, 16, 16)  # but >= 16 tokens a chunk
    assert 900 < kernels.split_plan(1, 151936, cpu, 10**6)[0] <= 1024  # and <= 1024 programs
    for B, V, split in ((1, 1, 3), (7, 4099, 3), (3, 17, 64), (256, 151936, None),
                        (1, 128256, None)):
        S, chunk, block = kernels.split_plan(B, V, cpu, split)
        assert chunk % 16 == 0 and S * chunk >= V > (S - 1) * chunk  # chunks tile the row
        assert block == min(2048, triton.next_power_of_2(chunk))
    for bad in (0, -2, 2.5, "3"):
        with pytest.raises(ValueError, match="split"):
            kernels.split_plan(4, 4099, cpu, bad)


def test_row_strided_and_broadcast_inputs():
    B, V = 7, 1271
    l_big, a_big = make_logits(B, V + 40, BF16, seed=3, ties=True, neg_inf=True)
    l, a = l_big[:, 29:29 + V], a_big[:, 3:3 + V]  # different row strides, unaligned starts
    assert l.stride(0) == V + 40 and not l.is_contiguous()
    alpha = row_alpha(B, "row")
    for r, mode in ((0.1, "score"), (0.0, "generate")):
        got = uld_combine(l, a, alpha=alpha, filter_ratio=r, mode=mode)
        want = uld_logits(l, a, alpha=alpha, filter_ratio=r, mode=mode)
        assert_logits_match(got, want, BF16, exact=EXACT and r > 0)
    rep_l, rep_a = l[3:4].expand(5, V), a[3:4].expand(5, V)  # row stride 0
    got = uld_combine(rep_l, rep_a, alpha=0.5, filter_ratio=0.01)
    assert_logits_match(got, uld_logits(rep_l, rep_a, alpha=0.5, filter_ratio=0.01), BF16,
                        EXACT)


def test_sampling_is_reproducible():
    l, a = make_logits(7, 4099, BF16, seed=5)
    kw = dict(alpha=0.8, filter_ratio=0.01, temperature=0.9)
    seeds = torch.tensor([11, 12, 13, 14, 15, 16, 17], device=DEV)
    first = uld_sample(l, a, seeds=seeds, **kw)
    assert torch.equal(first, uld_sample(l, a, seeds=seeds, **kw))
    assert torch.equal(first, uld_sample(l, a, seeds=11, **kw))  # int seed: row b uses seed + b
    others = [uld_sample(l, a, seeds=seeds + 100 * i, **kw) for i in range(1, 4)]
    assert any(not torch.equal(first, o) for o in others)
    torch.manual_seed(0)
    unseeded = uld_sample(l, a, **kw)
    torch.manual_seed(0)
    assert torch.equal(unseeded, uld_sample(l, a, **kw))


def test_sampled_tokens_respect_filter_and_top_k():
    B, V, r = 41, 1271, 0.1
    l, a = make_logits(B, V, F32, seed=6, neg_inf=True)
    ref = uld_logits(l, a, alpha=0.8, filter_ratio=r)
    ids = uld_sample(l, a, alpha=0.8, filter_ratio=r, temperature=50.0, seeds=1)
    rows = torch.arange(B, device=DEV)
    assert bool((ref[rows, ids] > NEG_INF)[1:].all())  # row 0 is all -inf: id 0
    assert ids[0] == 0
    ids = uld_sample(l, a, alpha=0.8, filter_ratio=r, temperature=50.0, seeds=2, top_k=3)
    third = ref.topk(3, dim=-1).values[:, -1]
    chosen = ref[rows, ids]
    assert bool(((chosen >= third) & (chosen > NEG_INF))[1:].all())
    # top_k = 1 at any temperature is greedy
    ids = uld_sample(l, a, alpha=0.8, filter_ratio=r, temperature=2.0, seeds=3, top_k=1)
    assert torch.equal(ids, ref.argmax(-1))


def chi_square(counts, p, n):
    """Pearson statistic and its 0.1% critical value (Wilson-Hilferty); sparse cells pooled."""
    expected = p * n
    big = expected >= 5
    obs = torch.cat([counts[big], counts[~big].sum().reshape(1)])
    exp = torch.cat([expected[big], expected[~big].sum().reshape(1)])
    if exp[-1] < 5:  # too small to be a cell of its own: fold into the smallest big one
        j = int(exp[:-1].argmin())
        obs[j] += obs[-1]
        exp[j] += exp[-1]
        obs, exp = obs[:-1], exp[:-1]
    stat = float(((obs - exp) ** 2 / exp).sum())
    df = len(exp) - 1
    z = 3.09  # one-sided 0.1%
    crit = df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3
    return stat, crit


@pytest.mark.parametrize("r,top_k,temperature,V,n",
                         [(0.0, None, 1.3, 24, 1000), (0.2, 6, 0.7, 64, 400)])
def test_sampling_distribution_matches_softmax(r, top_k, temperature, V, n):
    g = torch.Generator().manual_seed(7)
    l, a = torch.randn(1, V, generator=g) * 1.5, torch.randn(1, V, generator=g)
    l, a = l.to(DEV), a.to(DEV)
    s = uld_logits(l, a, alpha=0.6, filter_ratio=r).double()[0]
    if top_k:
        s = torch.where(s >= s.topk(top_k).values[-1], s, NEG_INF)
    ids = uld_sample(l.expand(n, V), a.expand(n, V), alpha=0.6, filter_ratio=r,
                     temperature=temperature, seeds=torch.arange(n) * 7919 + 1, top_k=top_k)
    counts = torch.bincount(ids, minlength=V).double().cpu()
    s = s.cpu()
    p = torch.softmax(s / temperature, 0)
    assert counts[p == 0].sum() == 0, "a masked token was sampled"
    stat, crit = chi_square(counts, p, n)
    assert stat < crit, f"chi2 {stat:.1f} >= {crit:.1f}"
    # the test has power: the same draws reject a distribution with the wrong temperature
    wrong, _ = chi_square(counts, torch.softmax(s / (temperature * 1.6), 0), n)
    assert wrong > crit


# --- the rule's options: the confidence gate and the above-uniform penalty ------------------

GATE = (1.0, 3.0)
# (penalty, gate) beside the paper's ("logit", None), which the cases above check bit for bit
RULES = {"gate": ("logit", GATE), "above": ("above_uniform", None),
         "gated": ("above_uniform", GATE)}
BETWEEN, OPEN, CLOSED = 0, 1, 2  # where gated_logits puts each kind of row (cycling)


def gated_logits(B, V, dtype=F32, *, seed=0, neg_inf=False):
    """Assistant rows cycle half-confident / confident / near-uniform, so that the gate
    (1, 3) is in between, open and closed (KL(p_a || U) ~ std^2 / 2 for Gaussian logits;
    ``assert_gate_rows`` checks it). ``neg_inf`` (B >= 8): scattered -inf in both; row 2
    (closed) -inf on a fifth of the assistant, which a closed gate ignores; row 3 a -inf
    assistant logit on the target's top token; row 4 fewer than k finite target logits;
    row 6 no finite assistant logit (KL 0: closed, and no shift); row 7 an all -inf target."""
    g = torch.Generator().manual_seed(seed)
    l = torch.randn(B, V, generator=g) * 3
    scale = torch.tensor([2.0, 6.0, 0.01])[torch.arange(B) % 3].unsqueeze(1)
    a = torch.randn(B, V, generator=g) * scale
    if neg_inf:
        l[torch.rand(B, V, generator=g) < 0.05] = NEG_INF
        a[torch.rand(B, V, generator=g) < 0.05] = NEG_INF
        a[2, :V // 5] = NEG_INF
        a[3, l[3].argmax()] = NEG_INF
        l[4, 3:] = NEG_INF
        a[6] = NEG_INF
        l[7] = NEG_INF
    return l.to(DEV, dtype), a.to(DEV, dtype)


def assert_gate_rows(a):
    w = confidence_gate(a[:3].float(), GATE)
    assert 0.05 < w[BETWEEN] < 0.95
    assert w.shape[0] <= OPEN or w[OPEN] == 1.0
    assert w.shape[0] <= CLOSED or w[CLOSED] == 0.0


def gated_alpha(B, kind):
    return 0.8 if kind == "float" else torch.linspace(0.3, 1.5, B).to(DEV)


# (B, V, r, dtype, mode, neg_inf, alpha): every r, dtype and mode, B = 1 and a few, V not a
# multiple of the block; each runs under every rule and in both launch variants
GATED_CASES = [
    (1, 1271, 0.1, F32, "generate", False, "float"),
    (8, 1271, 0.01, BF16, "score", True, "row"),
    (8, 999, 0.0, F16, "generate", True, "row"),
    (3, 4099, 0.1, F16, "score", False, "row"),
    (8, 4099, 0.0, F32, "score", True, "float"),
    (8, 999, 0.1, BF16, "generate", True, "row"),
    (5, 4099, 0.01, F16, "generate", False, "row"),
]


def gated_id(c):
    B, V, r, dtype, mode, neg_inf, alpha = c
    return f"B{B}-V{V}-r{r}-{str(dtype)[6:]}-{mode}-{alpha}" + ("-inf" if neg_inf else "")


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("rule", list(RULES))
@pytest.mark.parametrize("case", GATED_CASES, ids=gated_id)
def test_gated_rule_matches_reference(case, rule, variant):
    B, V, r, dtype, mode, neg_inf, alpha = case
    penalty, gate = RULES[rule]
    l, a = gated_logits(B, V, dtype, seed=V + B, neg_inf=neg_inf)
    assert_gate_rows(a)
    alpha = gated_alpha(B, alpha)
    kw = dict(alpha=alpha, filter_ratio=r, mode=mode, penalty=penalty, gate=gate)
    with launched("combine") as n:
        got = uld_combine(l, a, split=VARIANTS[variant], **kw)
    assert n.only(variant_name(VARIANTS[variant]))
    assert not torch.isnan(got).any()
    # the KL and the shift are sums in another order than torch's: close, not bit-exact
    assert_logits_match(got, uld_logits(l, a, **kw), dtype, exact=False)
    if gate is not None and r > 0 and B > CLOSED:
        # a closed gate is a weight of exactly 0: the row is the target's, bit for bit
        kept = got[CLOSED] != NEG_INF
        assert torch.equal(got[CLOSED][kept], l[CLOSED].float()[kept])
    if rule == "gate" and r > 0 and B > OPEN and EXACT:
        # and an open one exactly 1: the paper's rule, bit for bit
        paper = uld_logits(l, a, alpha=alpha, filter_ratio=r, mode=mode)
        assert torch.equal(got[OPEN], paper[OPEN])


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("rule", list(RULES))
@pytest.mark.parametrize("case", [c for c in GATED_CASES if c[4] == "generate" or c[2] == 0],
                         ids=gated_id)
def test_gated_greedy_ids_equal_reference_argmax(case, rule, variant):
    B, V, r, dtype, _, neg_inf, alpha = case
    penalty, gate = RULES[rule]
    l, a = gated_logits(B, V, dtype, seed=V + B + 1, neg_inf=neg_inf)
    alpha = gated_alpha(B, alpha)
    kw = dict(alpha=alpha, filter_ratio=r, penalty=penalty, gate=gate)
    # each row's winner duplicated half a row away: a tie the first index must win
    l, a = l.clone(), a.clone()
    win = uld_logits(l, a, **kw).argmax(-1)
    rows = torch.arange(B, device=DEV)
    l[rows, (win + V // 2) % V] = l[rows, win]
    a[rows, (win + V // 2) % V] = a[rows, win]
    with launched("sample") as n:
        got = uld_sample(l, a, temperature=0.0, split=VARIANTS[variant], **kw)
    assert n.only(variant_name(VARIANTS[variant]))
    assert torch.equal(got, uld_logits(l, a, **kw).argmax(-1))


def test_gated_rule_on_many_programs_per_row():
    """The automatic split (32 programs of a 32000-token row): the rule's per-chunk
    statistics merged by the row's last program, in the logits and the greedy id."""
    l, a = gated_logits(1, 32000, BF16, seed=4)
    assert kernels.split_plan(1, 32000, torch.device(DEV))[0] == 32
    kw = dict(alpha=0.8, filter_ratio=0.01, penalty="above_uniform", gate=GATE)
    with launched("combine") as n:
        got = uld_combine(l, a, **kw)
    assert n.only("split")
    want = uld_logits(l, a, **kw)
    assert_logits_match(got, want, BF16, exact=False)
    with launched("sample") as n:
        assert torch.equal(uld_sample(l, a, **kw), want.argmax(-1))
    assert n.only("split")


@pytest.mark.parametrize("rule", ["gate", "gated"])
def test_gated_sampling_reproducible_and_only_kept_tokens(rule):
    """Seeded draws under the rule: split-row draws the ids of one program per row, again on
    a rerun; only kept tokens (generate mode) and, with top-k (per row: off, 1, 3, V = off,
    50, ...), only tokens at or above the k-th score."""
    penalty, gate = RULES[rule]
    B, V = 8, 1271
    l, a = gated_logits(B, V, BF16, seed=12, neg_inf=True)
    top_k = torch.tensor([0, 1, 3, V, 50, 0, 7, 2], device=DEV)
    alpha = gated_alpha(B, "row")
    rows = torch.arange(B, device=DEV)
    for r, temperature, k in ((0.1, 0.8, top_k), (0.0, 1.5, None), (0.0, 1.0, top_k),
                              (0.01, 3.0, top_k)):
        kw = dict(alpha=alpha, filter_ratio=r, temperature=temperature, seeds=9, top_k=k,
                  penalty=penalty, gate=gate)
        with launched("sample") as n:
            got = uld_sample(l, a, split=4, **kw)
        assert n.only("split")
        assert torch.equal(got, uld_sample(l, a, split=False, **kw))
        assert torch.equal(got, uld_sample(l, a, split=4, **kw))
        ref = uld_logits(l, a, alpha=alpha, filter_ratio=r, penalty=penalty, gate=gate)
        chosen = ref[rows, got]
        assert got[7] == 0  # row 7 is all -inf
        assert bool((chosen > NEG_INF)[:7].all()), "a masked token was sampled"
        if k is not None:
            on = (top_k > 0) & (top_k < V)
            kth = torch.stack([ref[i].topk(max(int(top_k[i]), 1)).values[-1]
                               for i in range(B)])
            assert bool((chosen >= kth)[on & (rows < 7)].all())
            assert got[1] == ref[1].argmax()  # top_k = 1 at any temperature is greedy


def test_gated_sampling_distribution_matches_softmax():
    """Draws of the above-uniform rule with the gate in between, ``r == 0`` (where the sampler
    reduces the assistant on its own): softmax(s / T), and the test has power."""
    V, n, temperature = 64, 400, 0.9
    g = torch.Generator().manual_seed(7)
    l = torch.randn(1, V, generator=g) * 1.5
    # an assistant that likes the target's likely tokens: the penalty moves the mass
    a = l * 1.3 + torch.randn(1, V, generator=g)
    l, a = l.to(DEV), a.to(DEV)
    assert 0.05 < float(confidence_gate(a, GATE)[0]) < 0.95
    kw = dict(alpha=1.5, filter_ratio=0.0, penalty="above_uniform", gate=GATE)
    ids = uld_sample(l.expand(n, V), a.expand(n, V), temperature=temperature,
                     seeds=torch.arange(n) * 7919 + 1, **kw)
    counts = torch.bincount(ids, minlength=V).double().cpu()
    s = uld_logits(l, a, **kw).double()[0].cpu()
    stat, crit = chi_square(counts, torch.softmax(s / temperature, 0), n)
    assert stat < crit, f"chi2 {stat:.1f} >= {crit:.1f}"
    # the same draws reject the rule without its gate, the target alone (a closed gate) and
    # the paper's rule
    for wrong_kw in (dict(kw, gate=None), dict(kw, alpha=0.0), dict(alpha=1.5,
                                                                   filter_ratio=0.0)):
        wrong = uld_logits(l, a, **wrong_kw).double()[0].cpu()
        assert chi_square(counts, torch.softmax(wrong / temperature, 0), n)[0] > crit


def test_input_errors():
    l, a = make_logits(3, 64)
    with pytest.raises(ValueError, match="same shape"):
        uld_combine(l, a[:, :32])
    with pytest.raises(ValueError, match="same shape"):
        uld_sample(l[0], a[0])
    with pytest.raises(ValueError, match="float32, bfloat16 or float16"):
        uld_combine(l.double(), a.double())
    with pytest.raises(ValueError, match="filter_ratio"):
        uld_combine(l, a, filter_ratio=1.0)
    with pytest.raises(ValueError, match="mode"):
        uld_combine(l, a, mode="sample")
    with pytest.raises(ValueError, match="alpha"):
        uld_combine(l, a, alpha=torch.ones(4))
    with pytest.raises(ValueError, match="temperature"):
        uld_sample(l, a, temperature=-1.0)
    with pytest.raises(ValueError, match="penalty"):
        uld_combine(l, a, penalty="relu")
    for gate in ((3.0, 1.0), (1.0,), "1,3"):
        with pytest.raises(ValueError, match="gate"):
            uld_sample(l, a, gate=gate)
    assert uld_combine(l[:0], a[:0]).shape == (0, 64)
    assert uld_sample(l[:0], a[:0]).shape == (0,)


@pytest.mark.engine
@pytest.mark.skipif(ON_GPU, reason="CPU engine path; covered on GPU by the combine tests")
def test_engine_dense_path_uses_kernel(monkeypatch):
    assert combine._pick_backend("triton") == "triton"  # interpreted kernels run on CPU
    assert combine._pick_backend("auto") == ("triton" if torch.cuda.is_available() else "torch")
    with pytest.raises(UldError, match="unknown"):
        combine._pick_backend("cuda")
    g = torch.Generator().manual_seed(8)
    W, h_t, h_a = (torch.randn(1271, 32, generator=g), torch.randn(5, 32, generator=g),
                   torch.randn(5, 32, generator=g))
    # assistant rows whose gate is closed, in between (two) and open (two)
    h_a = h_a * torch.tensor([0.02, 0.3, 1.0, 0.35, 1.0]).unsqueeze(1)
    calls = []
    module = sys.modules["uld_vllm.kernels.uld_combine"]
    monkeypatch.setattr(module, "uld_combine_forward", _spy(module.uld_combine_forward, calls))
    # the engine passes no split: at 5 x 1271 the shape heuristic splits each row in two
    assert kernels.split_plan(5, 1271, torch.device("cpu")) == (2, 1024, 1024)
    # the paper's rule (exact with r > 0) and the gated one, which the engine passes on
    for r, mode, penalty, gate in ((0.01, "generate", "logit", None),
                                   (0.1, "score", "logit", None),
                                   (0.0, "generate", "logit", None),
                                   (0.01, "generate", "above_uniform", GATE),
                                   (0.0, "score", "above_uniform", GATE)):
        c = combine.UldCombiner(SimpleNamespace(alpha=0.8, filter_ratio=r, mode=mode,
                                                penalty=penalty, gate=gate,
                                                backend="triton"))
        assert c.backend == "triton"
        with launched("combine") as n:
            got = c(lambda _, h: h @ W.T, None, h_t, h_a)
        assert n.only("split")
        both = torch.cat([h_t, h_a]) @ W.T  # the same GEMM as the engine: same rounding
        want = uld_logits(both[:5], both[5:], alpha=0.8, filter_ratio=r, mode=mode,
                          penalty=penalty, gate=gate)
        assert_logits_match(got, want, F32, exact=r > 0 and gate is None)
    assert len(calls) == 5


def _spy(fn, calls):
    def wrapper(*args, **kwargs):
        calls.append(1)
        return fn(*args, **kwargs)
    return wrapper


def _run_python(code, timeout=300):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_without_interpreter_cpu_is_refused():
    res = _run_python("""
        import torch
        from uld_vllm.engine.combine import _pick_backend
        from uld_vllm.errors import UldError
        from uld_vllm.kernels import INTERPRETED, uld_combine
        assert not INTERPRETED
        try:
            _pick_backend("triton")
        except UldError as e:
            assert "TRITON_INTERPRET=1" in str(e) and "\\n" not in str(e), e
        else:
            assert torch.cuda.is_available()
        try:
            uld_combine(torch.zeros(2, 8), torch.zeros(2, 8))
        except ValueError as e:
            assert "TRITON_INTERPRET=1" in str(e), e
        else:
            raise AssertionError("CPU tensors accepted without the interpreter")
        print("OK")
    """)
    assert res.returncode == 0 and "OK" in res.stdout, res.stderr[-3000:]


AOT = """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from uld_vllm.kernels._select import _split_pass_kernel, _split_stats_kernel
    from uld_vllm.kernels.uld_combine import (_split_filter_kernel, _split_logprob_kernel,
                                              _split_lse_kernel, _uld_filter_kernel,
                                              _uld_logprob_kernel)
    from uld_vllm.kernels.uld_sample import _split_sample_kernel, _uld_sample_kernel

    base = dict(alpha_ptr="*fp32", stride_l="i64", stride_a="i32", V="i32", BLOCK="constexpr")
    filt = dict(k="i32", ln_r="fp32")
    # the rule's options: scalars, and which paths run (fp32 the paper's, bf16 the gated
    # above-uniform rule; the penalty and the gate are separate constexprs, so both compile)
    rule = dict(log_v="fp32", gate_lo="fp32", gate_width="fp32")
    flags = dict(STATS="constexpr", GATE="constexpr", ABOVE_UNIFORM="constexpr")
    for dt in ("bf16", "fp32"):
        on = dt == "bf16"
        rk = dict(STATS=on, GATE=on, ABOVE_UNIFORM=on)
        io = dict(l_ptr="*" + dt, a_ptr="*" + dt)
        comb = dict(io, out_ptr="*fp32", **base, stride_o="i32")
        samp = dict(io, ids_ptr="*i64", temp_ptr="*fp32", seed_ptr="*i64", top_k_ptr="*i32",
                    **base)
        npass = 2 if dt == "bf16" else 4  # key_passes: the radix passes the dtype needs
        jobs = [(_uld_filter_kernel, dict(comb, **filt, **rule, SCORE_MODE="constexpr",
                                          NPASS="constexpr", **flags),
                 dict(SCORE_MODE=dt == "bf16", BLOCK=4096, NPASS=npass, **rk)),
                (_uld_filter_kernel, dict(comb, **filt, **rule, SCORE_MODE="constexpr",
                                          NPASS="constexpr", **flags),
                 dict(SCORE_MODE=False, BLOCK=4096, NPASS=npass, STATS=True, GATE=on,
                      ABOVE_UNIFORM=not on)),
                (_uld_logprob_kernel, dict(comb, **rule, **flags), dict(BLOCK=4096, **rk)),
                (_uld_sample_kernel, dict(samp, **filt, **rule, FILTER="constexpr",
                                          NPASS="constexpr", **flags),
                 dict(FILTER=dt == "bf16", BLOCK=4096, NPASS=npass, **rk)),
                (_uld_sample_kernel, dict(samp, **filt, **rule, FILTER="constexpr",
                                          NPASS="constexpr", **flags),
                 dict(FILTER=False, BLOCK=4096, NPASS=npass, STATS=True, GATE=True,
                      ABOVE_UNIFORM=on))]
        # split-row: the radix pass (threshold with the row max and the rule's statistics;
        # top-k floor on scores), the writes, the r == 0 stages and the sampler's merge
        chunked = dict(io, stride_l="i64", stride_a="i32", V="i32", CHUNK="i32", S="i32",
                       BLOCK="constexpr")
        split_pass = dict(chunked, B="i32", k="i32", top_k_ptr="*i32", ln_r="fp32",
                          thr_ptr="*i32", alpha_ptr="*fp32", shift_ptr="*fp32",
                          hist_ptr="*i32", ticket_ptr="*i32", pmax_ptr="*fp32",
                          state_ptr="*i32", stats_ptr="*fp32", rule_ptr="*fp32", **rule,
                          PASS="constexpr", NPASS="constexpr", ON_SCORES="constexpr",
                          S_BLOCK="constexpr", **flags)
        for p, on_scores in ((0, False), (1, False), (0, True), (3, True)):
            jobs.append((_split_pass_kernel, split_pass,
                         dict(PASS=p, NPASS=4 if on_scores else 2, ON_SCORES=on_scores,
                              BLOCK=2048, S_BLOCK=8, **rk)))
        out = dict(out_ptr="*fp32", alpha_ptr="*fp32", stride_o="i32")
        jobs += [(_split_filter_kernel, dict(chunked, **out, shift_ptr="*fp32",
                                             state_ptr="*i32", SCORE_MODE="constexpr",
                                             ABOVE_UNIFORM="constexpr"),
                  dict(SCORE_MODE=dt == "bf16", BLOCK=1024, ABOVE_UNIFORM=on)),
                 (_split_lse_kernel, dict(chunked, part_ptr="*fp32", STATS="constexpr"),
                  dict(BLOCK=2048, STATS=on)),
                 (_split_logprob_kernel, dict(chunked, **out, part_ptr="*fp32", **rule,
                                              S_BLOCK="constexpr", **flags),
                  dict(BLOCK=2048, S_BLOCK=32, **rk)),
                 (_split_sample_kernel, dict(chunked, ids_ptr="*i64", alpha_ptr="*fp32",
                                             shift_ptr="*fp32", temp_ptr="*fp32",
                                             seed_ptr="*i64", thr_ptr="*i32",
                                             floor_ptr="*i32", pval_ptr="*fp32",
                                             pidx_ptr="*i32", ticket_ptr="*i32",
                                             ABOVE_UNIFORM="constexpr", S_BLOCK="constexpr"),
                  dict(BLOCK=2048, S_BLOCK=8, ABOVE_UNIFORM=on)),
                 (_split_stats_kernel, dict(a_ptr="*" + dt, stride_a="i32", V="i32",
                                            CHUNK="i32", S="i32", B="i32", alpha_ptr="*fp32",
                                            stats_ptr="*fp32", ticket_ptr="*i32",
                                            rule_ptr="*fp32", **rule, GATE="constexpr",
                                            BLOCK="constexpr", S_BLOCK="constexpr"),
                  dict(GATE=on, BLOCK=2048, S_BLOCK=8))]
        for fn, sig, const in jobs:
            sig = {name: sig[name] for name in fn.arg_names}
            c = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=const),
                               target=GPUTarget("cuda", 90, 32), options={"num_warps": 8})
            assert c.asm["cubin"], fn
    print("OK")
"""


def test_kernels_compile_for_hopper():
    """The interpreter accepts code the compiler rejects; compile to sm_90 cubin (no GPU)."""
    try:
        import triton.backends.nvidia  # noqa: F401
    except ImportError:
        pytest.skip("this triton has no NVIDIA backend")
    res = _run_python(AOT)
    assert res.returncode == 0 and "OK" in res.stdout, res.stderr[-3000:]
