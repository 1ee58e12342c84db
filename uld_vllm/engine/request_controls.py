"""Per-request ULD controls: ``uld_alpha`` / ``uld_mode`` in ``SamplingParams.extra_args``.

Where the values travel (vLLM V1 model runner):

* the frontend (API server or ``LLM``) runs ``UldRequestControls.validate_params`` at request
  admission, so a bad value is refused (HTTP 400 online) before it reaches the engine;
* in the worker, ``_update_states`` hands every logits processor the batch changes (rows added
  with their ``SamplingParams``, removed, moved) *before* the forward; ``UldRequestControls``
  keeps the per-row values in a ``RowControls`` that the ULD model's ``compute_logits`` reads.
  The sampled rows reach ``compute_logits`` in input-batch order, one per request, which is the
  order the row indices of those batch changes refer to;
* after the sampled rows, the runner computes prompt log-probs with one ``compute_logits`` call
  per request, without saying which request. Those calls therefore use the engine's settings
  (``--uld-alpha``/``--uld-mode``), and a request that sets a ``uld_*`` key together with
  ``prompt_logprobs`` is refused rather than answered with settings it did not ask for.

``RowControls`` is found by the model through ``controls_for(vllm_config)``: the runner builds
its logits processors in its constructor, before it builds the model, from the same config
object, in the same worker process.
"""

from __future__ import annotations

import math

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor
from vllm.v1.sample.logits_processor.builtin import process_dict_updates

from uld_vllm.core.logits import MODES

# the keys a request may set, and what they mean (named in every refusal)
KEYS = {
    "uld_alpha": "a number >= 0 (0 serves the target's own distribution)",
    "uld_mode": f"one of {', '.join(repr(m) for m in MODES)}",
}
FQCN = "uld_vllm.engine.request_controls:UldRequestControls"


def parse_extra_args(extra_args: dict | None) -> tuple[float | None, str | None]:
    """``(alpha, mode)`` a request asks for (``None``: the engine's); ``ValueError`` otherwise.

    The message is one line naming the key and what to send instead."""
    if not extra_args:
        return None, None
    known = ", ".join(f"{k} ({v})" for k, v in KEYS.items())
    for key in extra_args:
        if isinstance(key, str) and key.startswith("uld_") and key not in KEYS:
            raise ValueError(f"unknown per-request ULD key {key!r}: the keys are {known}")
    alpha, mode = extra_args.get("uld_alpha"), extra_args.get("uld_mode")
    if alpha is not None:
        # bool is an int in Python, and JSON true must not read as alpha 1
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
            raise ValueError(f"uld_alpha must be {KEYS['uld_alpha']}, got {alpha!r} "
                             f"({type(alpha).__name__}): send it as a JSON number, e.g. 0.5")
        alpha = float(alpha)
        if not math.isfinite(alpha) or alpha < 0:
            raise ValueError(f"uld_alpha must be {KEYS['uld_alpha']}, got {alpha!r}: "
                             "send a finite value >= 0")
    if mode is not None and mode not in MODES:
        raise ValueError(f"uld_mode must be {KEYS['uld_mode']}, got {mode!r}: send "
                         "'generate' (filtered-out tokens impossible) or 'score'")
    return alpha, mode


class RowControls:
    """Per-row ``(alpha, mode)`` of the persistent batch, for the next sampled-rows call.

    Only rows that set a ``uld_*`` key are stored; the others use the engine's settings.
    ``take`` hands the rows out once per step (``update`` arms it): the first
    ``compute_logits`` call after the batch update is the sampled rows; later calls in the
    same step (prompt log-probs) and calls outside a step (warm-up, profiling) get ``None``.
    """

    def __init__(self):
        self.rows: dict[int, tuple[float | None, str | None]] = {}
        self.batch_size = 0
        self._armed = False

    def update(self, batch_update: BatchUpdate | None) -> None:
        process_dict_updates(self.rows, batch_update, _row_of)
        if batch_update is not None:
            self.batch_size = batch_update.batch_size
        self._armed = True

    def take(self, n: int) -> dict[int, tuple[float | None, str | None]] | None:
        if not self._armed:
            return None
        self._armed = False
        if not self.rows:
            return None
        if n != self.batch_size:
            # one logits row per scheduled request is what makes row i mean request i; a
            # runner that breaks it would silently give requests each other's settings
            raise RuntimeError(f"ULD per-request controls: compute_logits got {n} sampled rows "
                               f"for a batch of {self.batch_size} requests; this vLLM runner "
                               "path is not supported with per-request uld_* arguments")
        return dict(self.rows)


def _row_of(params, _prompt_ids, _output_ids):
    if params is None:
        return None
    alpha, mode = parse_extra_args(params.extra_args)
    return None if alpha is None and mode is None else (alpha, mode)


def validate_at_request_parsing() -> None:
    """Check ``uld_*`` arguments when the OpenAI server builds a request's SamplingParams.

    vLLM runs logits processors' ``validate_params`` when the request enters the engine
    client, which for ``stream=true`` happens after the 200 response has started: the refusal
    would be an error event inside a 200 stream. The OpenAI protocols build their
    SamplingParams with ``SamplingParams.from_optional`` while the handler can still answer
    400, so the server process (only one that serves ``--uld-adapter``) checks there too."""
    from vllm import SamplingParams
    from vllm.exceptions import VLLMValidationError

    if getattr(SamplingParams, "_uld_checked", False):
        return
    original = SamplingParams.from_optional

    def from_optional(*args, **kwargs):
        params = original(*args, **kwargs)
        try:
            UldRequestControls.validate_params(params)
        except ValueError as exc:
            raise VLLMValidationError(str(exc), parameter="vllm_xargs") from None
        return params

    SamplingParams.from_optional = staticmethod(from_optional)
    SamplingParams._uld_checked = True


# id(vllm_config) -> the worker's RowControls (one runner per worker process in V1)
_CONTROLS: dict[int, RowControls] = {}


def controls_for(vllm_config) -> RowControls | None:
    return _CONTROLS.get(id(vllm_config))


class UldRequestControls(LogitsProcessor):
    """vLLM V1 logits processor that carries ``uld_*`` request arguments to the ULD model.

    It changes no logits itself (``apply`` is the identity): the values are applied inside
    the model's ``compute_logits``, where both streams' logits exist."""

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        alpha, mode = parse_extra_args(sampling_params.extra_args)
        if (alpha is not None or mode is not None) and \
                sampling_params.prompt_logprobs is not None:
            raise ValueError("uld_alpha/uld_mode apply to sampled tokens only; prompt_logprobs "
                             "always use the engine's --uld-alpha/--uld-mode: drop the uld_* "
                             "keys from this request or ask for prompt_logprobs in another one")

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool):
        self.controls = RowControls()
        _CONTROLS[id(vllm_config)] = self.controls

    def is_argmax_invariant(self) -> bool:
        return True  # apply() is the identity

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        self.controls.update(batch_update)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        return logits
