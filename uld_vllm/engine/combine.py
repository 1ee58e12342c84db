"""The last step of a ULD engine step: two hidden states -> ULD logits.

Two ways to get there, same result (``uld_logits`` semantics):

* **dense**: one LM-head GEMM on ``[target; assistant]`` rows (``[2n, H] x [H, V]``), then
  ``uld_logits``;
* **sparse assistant head**: the target's logits first, its plausibility mask, then the
  assistant's logits *only for kept tokens* (``_head_at``): one GEMM against the head rows of
  the *union* of the tokens any row keeps. The filter keeps at least ``floor(r * V)`` tokens
  a row and, for a confident model, not many more (491 of 49152 for SmolLM2 at r = 0.01);
  rows of one batch share most of them (batch 32: ~3000-6500 distinct kept tokens against
  32 x 491), so this reads each needed head row once, where a per-row gather of head rows
  (memory-bound) cost more than the dense head. It is used when the batch keeps few tokens
  (on average ``<= sparse_fraction * V`` per row: ``sparse_head_fraction`` in
  ``additional_config["uld"]``, default 0.05; 1 forces it, 0 disables it); flat
  distributions (e.g. a randomly initialised model) keep most of the vocabulary, and then the
  dense GEMM is cheaper. On CPU the filter's top k, the check that each row keeps exactly
  those, the assistant's logits at the kept entries (a dot product each, reading the head rows
  in place: no gather, no union) and the ULD rows are one C call (``_sparse_combine_c``,
  ``uld_vllm.core.native``; the torch code where no C compiler is found or ``ULD_NATIVE=0``):
  the same selection and arithmetic bit for bit, the assistant's logits within one rounding
  of the torch GEMM's. A batch with a row that keeps more than its top k gets the C call's
  bounds (each row's k-th largest and largest logit) for its mask, and the general path.

The sparse head needs a plain, unsharded LM head (TP 1, no quantisation, no logit scaling or
soft-capping) and the torch backend; otherwise the dense path runs. The backend is chosen once,
at engine start (``backend`` in ``additional_config["uld"]``: auto|torch|triton, see
``_pick_backend``; ``ULD_BACKEND`` overrides it for development): ``triton`` runs the
dense combination in the fused kernel of ``uld_vllm.kernels`` (CUDA, or the Triton interpreter
on CPU with ``TRITON_INTERPRET=1``); ``torch`` runs ``uld_logits``.

Per-request values (``uld_vllm.engine.request_controls``): rows whose requests set their own
``uld_alpha``/``uld_mode`` are grouped by ``(alpha, mode)`` and each group runs the code above
with its values. ``alpha == 0`` (a request's or the engine's) returns the target's own logits,
unfiltered: exactly what plain vLLM computes for that row.
"""

from __future__ import annotations

import logging
import math
import os

import torch

from uld_vllm.core import native
from uld_vllm.core.logits import (
    combine_with_mask,
    keep_from_threshold,
    plausibility_mask,
    plausibility_threshold,
    uld_logits,
)
from uld_vllm.core.topk import TopKWithTies, top_k_with_ties
from uld_vllm.engine.settings import SPARSE_HEAD_FRACTION
from uld_vllm.errors import UldError

# a child of vLLM's logger: its handler, format and level (VLLM_LOGGING_LEVEL)
_log = logging.getLogger("vllm.uld_vllm")


class UldCombiner:
    """Built once per engine from its ``UldSettings`` (``additional_config["uld"]``). The
    environment variables ``ULD_BACKEND`` and ``ULD_SPARSE_HEAD_FRACTION`` override the config
    for development (benchmarks, kernel tests); the path chosen, and where each setting came
    from, is logged once when the engine starts."""

    def __init__(self, settings, sparse_fraction: float | None = None):
        self.alpha = settings.alpha
        self.filter_ratio = settings.filter_ratio
        self.mode = settings.mode
        backend, backend_from = settings.backend, "additional_config"
        if os.environ.get("ULD_BACKEND"):
            backend, backend_from = os.environ["ULD_BACKEND"], "ULD_BACKEND override"
        self.backend = _pick_backend(backend)
        if sparse_fraction is None:
            sparse_fraction = getattr(settings, "sparse_head_fraction", SPARSE_HEAD_FRACTION)
        frac_from = "additional_config"
        if os.environ.get("ULD_SPARSE_HEAD_FRACTION"):
            raw = os.environ["ULD_SPARSE_HEAD_FRACTION"]
            try:
                sparse_fraction = float(raw)
            except ValueError:
                raise UldError(f"ULD_SPARSE_HEAD_FRACTION={raw!r} is not a number",
                               "unset it or give a fraction in [0, 1]") from None
            frac_from = "ULD_SPARSE_HEAD_FRACTION override"
        self.sparse_fraction = sparse_fraction
        self._plain_head_of, self._plain_head_ok = None, False
        # c_finish: sparse steps that ran as one C call (_sparse_combine_c)
        self.stats = {"dense": 0, "sparse": 0, "target": 0, "per_request": 0, "c_finish": 0}
        # built (or found in the cache) here, at engine start, rather than in the first step
        selection = "torch"
        if self.backend == "torch" and native.library() is not None:
            selection = f"C ({native.status()})"
        self.description = (
            f"backend {self.backend} (asked: {backend}, from {backend_from}); sparse assistant "
            f"head when rows keep <= {self.sparse_fraction:g} of the vocabulary on average "
            f"(from {frac_from}; needs the torch backend and a plain LM head); the filter's "
            f"top k and kept-token head: {selection}")
        _log.info("ULD combine path: %s", self.description)

    def __call__(self, logits_processor, lm_head, h_t: torch.Tensor, h_a: torch.Tensor,
                 rows: dict[int, tuple[float | None, str | None]] | None = None
                 ) -> torch.Tensor | None:
        """ULD logits of ``n`` rows; ``rows`` maps a row index to its request's own
        ``(alpha, mode)`` (``None`` entries: the engine's setting)."""
        groups = self._groups(h_t.shape[0], rows)
        if len(groups) == 1:
            (alpha, mode), _ = groups.popitem()
            return self._combine(logits_processor, lm_head, h_t, h_a, alpha, mode)
        # rows that differ only in alpha/mode share every path below; running each group
        # through the same scalar code keeps each row exactly what its own engine computes
        out = None
        for (alpha, mode), idx in groups.items():
            ix = torch.tensor(idx, device=h_t.device)
            part = self._combine(logits_processor, lm_head, h_t.index_select(0, ix),
                                 h_a.index_select(0, ix), alpha, mode)
            if part is None:  # a rank that does not sample
                return None
            if out is None:
                out = torch.empty((h_t.shape[0], part.shape[1]), dtype=torch.float32,
                                  device=part.device)
            out[ix] = part.float()
        self.stats["per_request"] += 1
        return out

    def _groups(self, n: int, rows) -> dict[tuple[float, str], list[int]]:
        default = (float(self.alpha), self.mode)
        if not rows:
            return {default: list(range(n))}
        groups: dict[tuple[float, str], list[int]] = {}
        for i in range(n):
            alpha, mode = rows.get(i, (None, None))
            key = (default[0] if alpha is None else float(alpha),
                   default[1] if mode is None else mode)
            groups.setdefault(key, []).append(i)
        return groups

    def _combine(self, logits_processor, lm_head, h_t: torch.Tensor, h_a: torch.Tensor,
                 alpha: float, mode: str) -> torch.Tensor | None:
        if alpha == 0.0:
            # alpha 0 serves the target's own distribution: no assistant and no filter, the
            # logits plain vLLM computes for these rows
            self.stats["target"] += 1
            return logits_processor(lm_head, h_t)
        # the sparse paths are torch code with host syncs (nonzero, .all()): CPU only; on CUDA
        # the fused kernel filters and combines the dense logits in one pass instead
        if (self.backend == "torch" and self.filter_ratio > 0
                and self._plain_head(logits_processor, lm_head)):
            l_t = logits_processor(lm_head, h_t)
            k = self._filter_k(l_t.shape[1])
            lib = native.library() if k is not None and l_t.device.type == "cpu" else None
            if (lib is not None and l_t.dtype in _C_DTYPES
                    and lm_head.weight.dtype in _C_DTYPES):
                out, kth, row_max = _sparse_combine_c(lib, l_t, lm_head.weight, h_a, k,
                                                      self.filter_ratio, alpha, mode)
                if out is not None:
                    self.stats["sparse"] += 1
                    self.stats["c_finish"] += 1
                    return out
                l_t = l_t.float()
                keep = keep_from_threshold(
                    l_t, plausibility_threshold(kth, row_max, self.filter_ratio))
            else:
                l_t = l_t.float()
                top = self._kept_top_k(l_t)
                if top is None:
                    keep = plausibility_mask(l_t, self.filter_ratio)
                else:
                    out = self._top_k_rows(l_t, lm_head.weight, h_a, alpha, mode, top=top)
                    if out is not None:
                        self.stats["sparse"] += 1
                        return out
                    keep = _mask_from_top_k(l_t, top, self.filter_ratio)
            # cost model: dense = one GEMM over n rows x V; sparse = a gather of the union's
            # head rows (memory-bound) plus a GEMM over the union, which rows of a flat
            # distribution no longer share
            if int(keep.sum()) <= self.sparse_fraction * keep.numel():
                self.stats["sparse"] += 1
                return self._finish(l_t, _kept_logits(lm_head.weight, h_a, keep), keep,
                                    alpha, mode)
            l_a = logits_processor(lm_head, h_a).float()
            self.stats["dense"] += 1
            alpha_col = torch.full((l_t.shape[0], 1), float(alpha), device=l_t.device)
            return combine_with_mask(l_t, l_a, keep, alpha_col, mode)  # mask reused
        n = h_t.shape[0]
        logits = logits_processor(lm_head, torch.cat([h_t, h_a]))
        if logits is None:  # a rank that does not sample
            return None
        self.stats["dense"] += 1
        return _dense_uld(self.backend, logits[:n], logits[n:], alpha=alpha,
                          filter_ratio=self.filter_ratio, mode=mode)

    def _filter_k(self, V: int) -> int | None:
        """The filter's floor k (it keeps at least the k largest logits of a row), or None
        when the sparse head is off or would not pay (k above its fraction of V)."""
        k = max(1, math.floor(self.filter_ratio * V))
        if k >= V or k > self.sparse_fraction * V:
            return None
        return k

    def _kept_top_k(self, l_t: torch.Tensor) -> TopKWithTies | None:
        """Each row's top k with the values tied with the k-th (k: ``_filter_k``), or None
        when the sparse head is off or would not pay."""
        k = self._filter_k(l_t.shape[1])
        return None if k is None else top_k_with_ties(l_t, k)

    def _plain_head(self, logits_processor, lm_head) -> bool:
        """``_plain_head`` of this engine's head, checked once: the modules are the engine's
        own, fixed once it has loaded, and the checks cost ~30 us a step on CPU."""
        key = (id(logits_processor), id(lm_head))
        if self._plain_head_of != key:
            self._plain_head_ok = _plain_head(logits_processor, lm_head)
            self._plain_head_of = key
        return self._plain_head_ok

    def _top_k_rows(self, l_t, weight, h_a, alpha=None, mode=None, top=None):
        """Fast path for confident rows: when every row keeps its top k (and the values tied
        with the k-th) and nothing else.

        That holds when the k-th largest logit is at most ``max + ln r`` (the top-k floor
        decides the threshold); ``top_k_with_ties`` then lists the kept tokens, and the
        assistant's logits are computed for those only (``_head_at``). Returns None when some
        row keeps more (the general path then runs). ``alpha``/``mode``: this call's values
        (default: the engine's); ``top``: ``_kept_top_k(l_t)`` when already computed.
        """
        alpha = self.alpha if alpha is None else alpha
        mode = self.mode if mode is None else mode
        top = self._kept_top_k(l_t) if top is None else top
        if top is None:
            return None
        # a k-th value of -inf: fewer than k finite logits, whose -inf ones are never kept
        if not bool(((top.kth <= top.row_max + math.log(self.filter_ratio))
                     & (top.kth > float("-inf"))).all()):
            return None
        vals = top.values
        if alpha != 0.0:
            vals = vals - alpha * _head_at(weight, h_a, top.cols, top.rows)
        out = torch.full_like(l_t, float("-inf")) if mode == "generate" else l_t.clone()
        out[top.rows, top.cols] = vals
        return out

    def _finish(self, l_t, kept_a, keep, alpha=None, mode=None):
        """generate: l - alpha*a on kept, -inf elsewhere; score: target logit elsewhere."""
        alpha = self.alpha if alpha is None else alpha
        mode = self.mode if mode is None else mode
        rows, cols = keep.nonzero(as_tuple=True)
        vals = l_t[rows, cols] if kept_a is None else l_t[rows, cols] - alpha * kept_a
        out = torch.full_like(l_t, float("-inf")) if mode == "generate" else l_t.clone()
        out[rows, cols] = vals
        return out


# logits and head dtypes the one-call C combine reads (csrc/sparse_combine.c)
_C_DTYPES = (torch.float32, torch.bfloat16)


def _sparse_combine_c(lib, l_t: torch.Tensor, weight: torch.Tensor, h_a: torch.Tensor, k: int,
                      filter_ratio: float, alpha: float, mode: str):
    """``(out, kth, row_max)`` of ``csrc/sparse_combine.c``: the ULD logits (float32
    ``[n, V]``) when every row keeps exactly its top k and the ties with the k-th, else
    ``out`` None; ``kth``/``row_max`` (float32 ``[n, 1]``) are each row's k-th largest and
    largest logit either way, for the filter's mask. The selection and the values are those
    of ``_top_k_rows``; the assistant's logit at a kept entry is a dot product with its head
    row, read in place (bf16 heads: rounded to bf16, as the head's GEMM rounds; within one
    rounding of the GEMM's value, its sum runs in another order).

    Few torch calls on purpose: at batch 1 the Python around the C cost more than the C
    itself (each torch call is paid with cold caches after a step that streams the model)."""
    n, V = l_t.shape
    x = l_t if l_t.is_contiguous() else l_t.contiguous()
    w = weight if weight.is_contiguous() else weight.contiguous()
    h = h_a if h_a.dtype == w.dtype and h_a.is_contiguous() else h_a.to(w.dtype).contiguous()
    out = torch.empty((n, V), dtype=torch.float32)
    bounds = torch.empty((2, n, 1), dtype=torch.float32)  # kth, row_max
    at = bounds.data_ptr()
    args = (out.data_ptr(), x.data_ptr(), x.dtype == torch.bfloat16, n, V, k,
            math.log(filter_ratio), w.data_ptr(), w.dtype == torch.bfloat16, h.data_ptr(),
            w.shape[1], alpha, mode == "generate", at, at + 4 * n)
    if torch.autograd.profiler._is_profiler_enabled:  # a named range: profiles see no C call
        with torch.profiler.record_function("uld::sparse_combine (C)"):
            status = lib.uld_sparse_combine(*args)
    else:
        status = lib.uld_sparse_combine(*args)
    if status < 0:
        raise MemoryError("the C combine could not allocate its scratch buffers (a few V-sized "
                          "arrays); free memory, or set ULD_NATIVE=0 to run the torch code")
    if status == 0:
        return out, None, None
    return None, bounds[0], bounds[1]


def _mask_from_top_k(l_t: torch.Tensor, top: TopKWithTies, filter_ratio: float) -> torch.Tensor:
    """``plausibility_mask(l_t, filter_ratio)`` from the rows' k-th and largest values, which
    ``top`` already holds: kept iff ``l >= min(kth, max + ln r)``, never at ``-inf``."""
    return keep_from_threshold(l_t, plausibility_threshold(top.kth, top.row_max, filter_ratio))


def _kept_logits(weight: torch.Tensor, h_a: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Assistant logits at the kept positions, row-major (the order of ``keep.nonzero()``)."""
    rows, cols = keep.nonzero(as_tuple=True)
    return _head_at(weight, h_a, cols, rows)


def _head_at(weight: torch.Tensor, h_a: torch.Tensor, cols: torch.Tensor,
             rows: torch.Tensor | None = None) -> torch.Tensor:
    """``W[c] . h_a[r]`` for every requested (row r, column c), returned as float32: ``cols``
    ``[n, k]`` (row ``b`` of ``cols`` belongs to row ``b`` of ``h_a``), or flat pairs with
    ``rows``.

    One GEMM ``[n, H] x [H, U]`` against the head rows of the union of the requested columns
    (U of them; rows of a batch share most of their kept tokens), then a gather: each needed
    head row is read once for the whole batch, where a per-row gather of head rows (memory-
    bound) cost more than the dense head. The GEMM runs in the head's dtype, as the LM head
    computes the target's logits (a bf16 model's logits are bf16 on the dense path too)."""
    if h_a.shape[0] == 1:  # one row: its own head rows, no union
        la = _gemm(h_a.to(weight.dtype), weight.index_select(0, cols.reshape(-1)))
        return la.float().view(cols.shape)
    used = torch.zeros(weight.shape[0], dtype=torch.bool, device=weight.device)
    used[cols.reshape(-1)] = True
    u = used.nonzero()[:, 0]
    # position of every used column inside u (its rank among the used columns)
    pos = torch.cumsum(used, 0) - 1
    la = _gemm(h_a.to(weight.dtype), weight.index_select(0, u)).float()
    if rows is None:
        return la.gather(1, pos[cols])
    return la[rows, pos[cols]]


def _gemm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``x @ w.T`` for a few rows ``x`` against many rows ``w`` gathered this step.

    float32 on CPU: vLLM's oneDNN GEMM with ``x`` as the packed operand. Packing the few rows
    costs ~0.2 ms, and oneDNN then runs the ``[U, H] x [H, n]`` product at about 3x the speed
    of torch's float32 GEMM (MKL) on this project's Zen 5 core (batch 32, U = 3238: 0.66
    against 1.7 ms). bf16 gains nothing from it: torch's bf16 GEMM already runs on oneDNN."""
    if x.device.type == "cpu" and x.shape[0] > 1 and x.dtype == torch.float32:
        from vllm import _custom_ops as ops

        if ops._supports_onednn:
            return ops.onednn_mm(ops.create_onednn_mm(x.t(), 32), w, None).t()
    return torch.nn.functional.linear(x, w)


def _plain_head(logits_processor, lm_head) -> bool:
    from vllm.model_executor.layers.vocab_parallel_embedding import UnquantizedEmbeddingMethod

    return (getattr(lm_head, "tp_size", 1) == 1
            and isinstance(getattr(lm_head, "quant_method", None), UnquantizedEmbeddingMethod)
            and getattr(lm_head, "bias", None) is None
            and logits_processor.scale == 1.0 and logits_processor.soft_cap is None
            and not logits_processor.logits_as_input
            and getattr(lm_head, "weight", None) is not None and lm_head.weight.numel() > 0)


def _pick_backend(requested: str) -> str:
    """``auto``: the fused Triton kernel on CUDA (when Triton imports), torch elsewhere.

    ``triton`` forced without a GPU runs the kernels in the Triton interpreter, which only
    exists when ``TRITON_INTERPRET=1`` was set before ``uld_vllm.kernels`` was imported.
    """
    if requested == "torch":
        return "torch"
    if requested == "auto":
        if not torch.cuda.is_available():
            return "torch"
        try:
            from uld_vllm import kernels
        except ImportError:
            return "torch"
        return "torch" if kernels.INTERPRETED else "triton"
    if requested == "triton":
        try:
            from uld_vllm import kernels
        except ImportError as e:
            raise UldError(f"ULD_BACKEND=triton but the Triton kernels do not import ({e})",
                           "install triton, or set ULD_BACKEND=torch") from e
        if not torch.cuda.is_available() and not kernels.INTERPRETED:
            raise UldError("ULD_BACKEND=triton needs a CUDA GPU",
                           "set TRITON_INTERPRET=1 before uld_vllm.kernels is imported to run "
                           "the kernels on CPU in the (slow) Triton interpreter, or set "
                           "ULD_BACKEND=torch")
        return "triton"
    raise UldError(f"ULD_BACKEND={requested!r} is unknown", "use 'auto', 'torch' or 'triton'")


def _dense_uld(backend: str, target: torch.Tensor, assistant: torch.Tensor, **kw) -> torch.Tensor:
    """``uld_logits`` semantics; the fused kernel when the backend is ``triton``."""
    if backend == "triton":
        from uld_vllm.kernels import uld_combine

        return uld_combine(target, assistant, **kw)
    return uld_logits(target, assistant, **kw)
