"""Per-request ULD controls: ``uld_alpha``, ``uld_mode``, ``uld_penalty``, ``uld_gate`` in
``SamplingParams.extra_args`` (``vllm_xargs`` over HTTP): a request's own values of the
engine's settings of the same names (``UldSettings``).

Where the values travel (vLLM V1 model runner):

* the frontend (API server or ``LLM``) runs ``UldRequestControls.validate_params`` and the
  engine's request policy (``check_policy``) at request admission, so a bad or disallowed
  value is refused (HTTP 400 online) before it reaches the engine;
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

What a request may ask is the engine's request policy (``UldSettings.request_policy``,
``--uld-request-policy``), checked by ``check_policy`` generically over ``KEYS``: a key in
``_ORDERED`` (higher is stronger unlearning) may rise above its served value under
``strengthen``; any other key weakens the unlearning by differing from the served value. The
served value of ``uld_X`` is ``UldSettings.X``. Where vLLM runs the check at admission is
``uld_vllm.engine.admission``; the worker checks again (``RowControls``) and serves a request
that got past admission anyway with the engine's own settings.
"""

from __future__ import annotations

import logging
import math

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor
from vllm.v1.sample.logits_processor.builtin import process_dict_updates

from uld_vllm.core.logits import MODES, PENALTIES, parse_gate
from uld_vllm.errors import UldError

# the keys a request may set, and what they mean (named in every refusal)
KEYS = {
    "uld_alpha": "a number >= 0 (0 serves the target's own distribution)",
    "uld_mode": f"one of {', '.join(repr(m) for m in MODES)}",
    "uld_penalty": f"one of {', '.join(repr(p) for p in PENALTIES)}",
    "uld_gate": "[low, high] nats of KL(p_assistant || uniform) with 0 <= low < high, or "
                "'off'",
}
FQCN = "uld_vllm.engine.request_controls:UldRequestControls"
# keys whose higher values unlearn more (alpha: more of the assistant is subtracted)
_ORDERED = {"uld_alpha"}
# keys whose allowed per-request values an operator may bound: key -> UldSettings field
RANGES = {"uld_alpha": "alpha_range"}
POLICY_FLAG = "--uld-request-policy"

# a child of vLLM's logger: its handler, format and level (VLLM_LOGGING_LEVEL)
_log = logging.getLogger("vllm.uld_vllm")


def served_field(key: str) -> str:
    """The ``UldSettings`` field holding the served value of per-request key ``key``."""
    return key.removeprefix("uld_")


def weakens(key: str, asked, served) -> bool:
    """Whether a request's ``asked`` value unlearns less than the ``served`` one."""
    if key in _ORDERED:
        return float(asked) < float(served)
    return asked != served


def _show(value) -> str:
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    if value is None:
        return "'off'"
    return f"{value:g}" if isinstance(value, (int, float)) else repr(value)


def check_policy(extra_args: dict | None, settings) -> None:
    """``ValueError`` (one line naming the key and the operator flag that would allow it)
    for a ``uld_*`` value that ``settings.request_policy`` or a range refuses (and for a
    malformed one: ``parse_extra_args``)."""
    overrides = parse_extra_args(extra_args)
    policy = settings.request_policy
    for key in KEYS:
        field = served_field(key)
        if field not in overrides:
            continue
        asked = overrides[field]
        served = getattr(settings, served_field(key))
        weaker = weakens(key, asked, served)
        if policy == "fixed" and asked != served:
            allowing = "any" if weaker else "strengthen"
            raise ValueError(f"{key} {_show(asked)} differs from the served {_show(served)} "
                             "and this engine's request policy 'fixed' allows no change: "
                             f"leave {key} out (the operator allows it with {POLICY_FLAG} "
                             f"{allowing})")
        if policy == "strengthen" and weaker:
            if key in _ORDERED:
                problem = (f"{key} {_show(asked)} is below the served {_show(served)}, "
                           "which weakens the unlearning")
                fix = f"send {key} >= {_show(served)} or leave it out"
            else:
                problem = (f"{key} {_show(asked)} differs from the served {_show(served)}, "
                           "which weakens the unlearning")
                fix = f"leave {key} out"
            raise ValueError(f"{problem}, and this engine's request policy 'strengthen' "
                             f"refuses it: {fix} (the operator allows it with {POLICY_FLAG} "
                             "any)")
        # after the policy, whose refusal says more (a weaker value is outside a range that
        # holds the served one as well)
        bounds = getattr(settings, RANGES[key]) if key in RANGES else None
        if bounds is not None and not bounds[0] <= float(asked) <= bounds[1]:
            flag = "--uld-" + RANGES[key].replace("_", "-")
            raise ValueError(f"{key} {_show(asked)} is outside this engine's allowed range "
                             f"[{_show(bounds[0])}, {_show(bounds[1])}] ({flag}): send a "
                             f"value in it or leave {key} out")


def policy_rules(settings) -> dict[str, str]:
    """What each per-request key may be under ``settings``' policy, in words."""
    rules = {}
    for key in KEYS:
        served = getattr(settings, served_field(key))
        bounds = getattr(settings, RANGES[key]) if key in RANGES else None
        if settings.request_policy == "fixed":
            rule = f"only the served {_show(served)}"
        elif settings.request_policy == "strengthen" and key in _ORDERED:
            rule = f">= the served {_show(served)}"
        elif settings.request_policy == "strengthen":
            rule = f"only the served {_show(served)}"
        else:
            rule = f"any ({KEYS[key]})"
        if bounds is not None:
            rule += f", within [{_show(bounds[0])}, {_show(bounds[1])}]"
        rules[key] = rule
    return rules


def describe_policy(settings) -> str:
    """One line: the request policy and what it lets a request's ``uld_*`` keys be."""
    rules = "; ".join(f"{k}: {v}" for k, v in policy_rules(settings).items())
    return f"request policy {settings.request_policy!r} ({POLICY_FLAG}): {rules}"


def parse_extra_args(extra_args: dict | None) -> dict:
    """The settings a request asks for, ``{UldSettings field: value}`` (only those it sets);
    ``ValueError`` otherwise, one line naming the key and what to send instead."""
    if not extra_args:
        return {}
    known = ", ".join(f"{k} ({v})" for k, v in KEYS.items())
    for key in extra_args:
        if isinstance(key, str) and key.startswith("uld_") and key not in KEYS:
            raise ValueError(f"unknown per-request ULD key {key!r}: the keys are {known}")
    out = {}
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
        out["alpha"] = alpha
    if mode is not None:
        if mode not in MODES:
            raise ValueError(f"uld_mode must be {KEYS['uld_mode']}, got {mode!r}: send "
                             "'generate' (filtered-out tokens impossible) or 'score'")
        out["mode"] = mode
    penalty = extra_args.get("uld_penalty")
    if penalty is not None:
        if penalty not in PENALTIES:
            raise ValueError(f"uld_penalty must be {KEYS['uld_penalty']}, got {penalty!r}")
        out["penalty"] = penalty
    if "uld_gate" in extra_args:
        out["gate"] = _gate(extra_args["uld_gate"])
    return out


def _gate(value):
    # a JSON list or "off"; the "LOW,HIGH" string form is the command line's
    off = isinstance(value, str) and value.strip().lower() == "off"
    if off or isinstance(value, (list, tuple)):
        try:
            return parse_gate(value)
        except UldError:
            pass
    raise ValueError(f"uld_gate must be {KEYS['uld_gate']}, got {value!r}: send e.g. "
                     "[1, 3] or 'off'")


class RowControls:
    """Per-row settings of the persistent batch (``{field: value}`` of the ``uld_*`` keys a
    row's request set), for the next sampled-rows call.

    Only rows that set a ``uld_*`` key are stored; the others use the engine's settings.
    ``take`` hands the rows out once per step (``update`` arms it): the first
    ``compute_logits`` call after the batch update is the sampled rows; later calls in the
    same step (prompt log-probs) and calls outside a step (warm-up, profiling) get ``None``.
    """

    def __init__(self, settings=None):
        self.rows: dict[int, dict] = {}
        self.batch_size = 0
        self._armed = False
        # the engine's UldSettings, set by the model it serves (built after this object)
        self.settings = settings

    def update(self, batch_update: BatchUpdate | None) -> None:
        process_dict_updates(self.rows, batch_update, self._row_of)
        if batch_update is not None:
            self.batch_size = batch_update.batch_size
        self._armed = True

    def take(self, n: int) -> dict[int, dict] | None:
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


    def _row_of(self, params, _prompt_ids, _output_ids):
        if params is None:
            return None
        try:
            overrides = parse_extra_args(params.extra_args)
            if self.settings is not None:
                check_policy(params.extra_args, self.settings)
        except ValueError as exc:
            # admission refuses these (uld_vllm.engine.admission); a request that reached the
            # worker another way must neither stop the engine (an exception here would) nor
            # be served more weakly than the policy allows: it gets the engine's settings
            _log.warning("ULD per-request controls: %s; this request is served with the "
                         "engine's settings", exc)
            return None
        return overrides or None


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
        if parse_extra_args(sampling_params.extra_args) and \
                sampling_params.prompt_logprobs is not None:
            raise ValueError("uld_* keys apply to sampled tokens only; prompt_logprobs always "
                             "use the engine's settings (--uld-alpha, --uld-mode, ...): drop "
                             "the uld_* keys from this request or ask for prompt_logprobs in "
                             "another one")

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool):
        self.controls = RowControls()
        _CONTROLS[id(vllm_config)] = self.controls

    def is_argmax_invariant(self) -> bool:
        return True  # apply() is the identity

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        self.controls.update(batch_update)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        return logits
