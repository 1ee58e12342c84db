"""How a ULD engine is configured: one ``additional_config["uld"]`` dict plus an architecture.

The plain-vLLM form of a ULD engine is::

    vllm.LLM(model, hf_overrides={"architectures": ["UldLlamaForCausalLM"]},
             additional_config={"uld": {"adapter": "/abs/adapter_dir", "alpha": 0.8,
                                        "filter_ratio": 0.01}})

``engine_overrides`` builds both from an adapter folder after validating it against the model,
so every entry point (``uld_vllm.LLM``, ``vllm serve --uld-adapter``) refuses bad input with one
line before any engine process starts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import sys
from pathlib import Path
from typing import Any

from uld_vllm.core.logits import (
    DEFAULT_GATE,
    DEFAULT_PENALTY,
    MODES,
    PENALTIES,
    parse_gate,
)
from uld_vllm.errors import UldError

# base architecture -> ULD architecture (registered lazily by uld_vllm.engine.plugin)
ULD_ARCHITECTURES = {
    "LlamaForCausalLM": "UldLlamaForCausalLM",
    "MistralForCausalLM": "UldMistralForCausalLM",
    "Qwen2ForCausalLM": "UldQwen2ForCausalLM",
}

# called by name through llm.collective_rpc (no pickled functions travel)
WORKER_EXTENSION = "uld_vllm.engine.worker.UldWorkerExtension"

# environment variables of earlier versions, and what replaced them (warned about, never read)
REMOVED_ENV = {
    "ULD_BACKEND": "additional_config['uld']['backend']",
    "ULD_NATIVE": "nothing: the CPU-only C combine is gone",
    "ULD_SPARSE_HEAD_FRACTION": "nothing: the CPU-only sparse assistant head is gone",
    "ULD_HOST_MALLOC": "nothing: for CPU serving preload tcmalloc (LD_PRELOAD), as vLLM's CPU "
                       "docs recommend",
}
BACKENDS = ("auto", "torch", "triton")  # see uld_vllm.engine.combine
# what a request's uld_* keys may do (uld_vllm.engine.request_controls.check_policy):
# "fixed": nothing but repeat the served values; "strengthen": raise uld_alpha, repeat the
# others; "any": whatever the engine can compute, the target's own distribution included
REQUEST_POLICIES = ("fixed", "strengthen", "any")
# named rules: `--uld-rule reference` is the paper's rule exactly
RULES = {"reference": {"penalty": "logit", "gate": None},
         "gated": {"penalty": DEFAULT_PENALTY, "gate": DEFAULT_GATE}}
# the additional_config["uld"] keys an engine reads; any other key is refused
_KEYS = ("adapter", "alpha", "filter_ratio", "mode", "penalty", "gate", "backend",
         "request_policy", "alpha_range", "adapter_hash")
UNSET = object()


@dataclasses.dataclass(frozen=True)
class UldSettings:
    """Every setting of a ULD engine: ``additional_config["uld"]`` and nowhere else."""

    adapter: str
    alpha: float
    filter_ratio: float
    mode: str = "generate"  # "score": masked tokens keep the target logit (TOFU scoring)
    penalty: str = DEFAULT_PENALTY  # uld_vllm.core.logits.PENALTIES
    gate: tuple[float, float] | None = DEFAULT_GATE  # KL(p_a || U) thresholds; None: off
    backend: str = "auto"   # "auto" | "torch" | "triton" (uld_vllm.engine.combine)
    # ULD leaves the weights untouched, so what requests may ask is the guarantee; a config
    # that does not say is served safe (uld_vllm.LLM passes "any" for its own caller)
    request_policy: str = "strengthen"
    alpha_range: tuple[float, float] | None = None  # allowed per-request uld_alpha

    @classmethod
    def from_dict(cls, raw: Any, adapter_config=None) -> "UldSettings":
        """Settings from ``additional_config["uld"]``; the decoding values left out there (a
        hand-written config) come from ``adapter_config``, the adapter's ``UldConfig``, which
        the caller has read already."""
        if not isinstance(raw, dict) or "adapter" not in raw:
            raise UldError("a ULD model class was chosen but additional_config has no "
                           "'uld': {'adapter': DIR}", "use uld_vllm.LLM(..., uld_adapter=DIR) "
                           "or `vllm serve MODEL --uld-adapter DIR`")
        unknown = sorted(set(raw) - set(_KEYS))
        if unknown:
            raise UldError(f"additional_config['uld'] has unknown keys {unknown}",
                           f"the keys are {', '.join(_KEYS)}")
        missing = [k for k in ("alpha", "filter_ratio") if k not in raw]
        if missing and adapter_config is None:
            raise UldError(f"additional_config['uld'] lacks {missing}",
                           "pass them, or the adapter's config to fill them in")
        s = cls(adapter=str(raw["adapter"]),
                alpha=_number(raw, "alpha", getattr(adapter_config, "alpha", None)),
                filter_ratio=_number(raw, "filter_ratio",
                                     getattr(adapter_config, "filter_ratio", None)),
                mode=str(raw.get("mode", "generate")),
                penalty=str(raw.get("penalty", getattr(adapter_config, "penalty",
                                                       DEFAULT_PENALTY))),
                gate=parse_gate(raw.get("gate", getattr(adapter_config, "gate", DEFAULT_GATE)),
                                "additional_config['uld']['gate']"),
                backend=str(raw.get("backend", "auto")),
                request_policy=str(raw.get("request_policy", "strengthen")),
                alpha_range=_range(raw.get("alpha_range")))
        s.validate()
        return s

    def validate(self) -> None:
        if self.mode not in MODES:
            raise UldError(f"ULD mode {self.mode!r} is unknown", f"use one of {MODES}")
        if self.penalty not in PENALTIES:
            raise UldError(f"--uld-penalty {self.penalty!r} is unknown",
                           f"use one of {', '.join(PENALTIES)}")
        if self.backend not in BACKENDS:
            raise UldError(f"ULD backend {self.backend!r} is unknown",
                           f"set additional_config['uld']['backend'] to one of {BACKENDS}")
        if not 0.0 <= self.filter_ratio < 1.0:
            raise UldError(f"--uld-filter-ratio {self.filter_ratio} is out of range",
                           "use a value in [0, 1), e.g. 0.1 or 0.01")
        if self.alpha < 0:
            raise UldError(f"--uld-alpha {self.alpha} is negative",
                           "use alpha >= 0 (0 disables the assistant)")
        if self.request_policy not in REQUEST_POLICIES:
            raise UldError(f"--uld-request-policy {self.request_policy!r} is unknown",
                           f"use one of {', '.join(REQUEST_POLICIES)}")
        if self.alpha_range is None:
            return
        lo, hi = self.alpha_range
        shown = f"--uld-alpha-range {lo:g},{hi:g}"
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise UldError(f"{shown} is not finite", "give two finite numbers MIN,MAX")
        if lo < 0:
            raise UldError(f"{shown} has a negative MIN",
                           "per-request alpha is >= 0: use MIN >= 0")
        if lo > hi:
            raise UldError(f"{shown} has MIN > MAX", "give MIN,MAX with MIN <= MAX, e.g. "
                           f"{self.alpha:g},{max(2 * self.alpha, 1):g}")
        if self.request_policy == "fixed":
            raise UldError(f"{shown} has no effect under --uld-request-policy fixed (no "
                           "request may change uld_alpha)",
                           "drop it, or use --uld-request-policy strengthen or any")
        # a request that repeats the served alpha must never be refused
        if not lo <= self.alpha <= hi:
            raise UldError(f"{shown} leaves out the served alpha {self.alpha:g}",
                           "widen the range or set --uld-alpha inside it")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        # additional_config travels as JSON (and is hashed as such)
        d["alpha_range"] = list(self.alpha_range) if self.alpha_range else None
        d["gate"] = list(self.gate) if self.gate else None
        return d

    @property
    def rule(self) -> dict:
        """What ``uld_vllm.core.logits.uld_logits`` takes besides alpha and mode."""
        return {"filter_ratio": self.filter_ratio, "penalty": self.penalty, "gate": self.gate}


def rule_settings(rule: str | None, penalty: str | None = None, gate=UNSET) -> dict:
    """The settings a named rule stands for, merged with explicit ``penalty``/``gate``
    (explicit values that contradict the named rule are refused)."""
    out = {}
    if rule is not None:
        if rule not in RULES:
            raise UldError(f"--uld-rule {rule!r} is unknown", f"use one of {', '.join(RULES)}")
        out = dict(RULES[rule])
        if penalty is not None and penalty != out["penalty"]:
            raise UldError(f"--uld-rule {rule} means --uld-penalty {out['penalty']}, not "
                           f"{penalty}", "drop one of the two flags")
        if gate is not UNSET and gate != out["gate"]:
            raise UldError(f"--uld-rule {rule} sets its own gate",
                           "drop --uld-gate or --uld-rule")
        return out
    if penalty is not None:
        out["penalty"] = penalty
    if gate is not UNSET:
        out["gate"] = gate
    return out


def parse_alpha_range(text: str) -> tuple[float, float]:
    """``--uld-alpha-range MIN,MAX`` as two floats (checked by ``UldSettings.validate``)."""
    parts = str(text).split(",")
    try:
        if len(parts) != 2:
            raise ValueError
        lo, hi = (float(p) for p in parts)
    except ValueError:
        raise UldError(f"--uld-alpha-range {text!r} is not MIN,MAX",
                       "give two numbers separated by a comma, e.g. 0.8,2") from None
    return lo, hi


def _range(value) -> tuple[float, float] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return parse_alpha_range(value)
    if (not isinstance(value, (list, tuple)) or len(value) != 2
            or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in value)):
        raise UldError(f"additional_config['uld']['alpha_range'] is {value!r}",
                       "give [MIN, MAX] (two numbers)")
    return float(value[0]), float(value[1])


def _number(raw: dict, key: str, default) -> float:
    value = raw.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UldError(f"additional_config['uld'][{key!r}] is {value!r}", "give a number")
    return float(value)


_warned_env = False


def warn_removed_env(environ=None) -> list[str]:
    """One warning line per removed ``ULD_*`` variable that is set (once per process)."""
    global _warned_env
    environ = os.environ if environ is None else environ
    lines = [f"uld-vllm: WARNING: {name} is set but no longer read; it was replaced by {what}"
             for name, what in REMOVED_ENV.items() if name in environ]
    if not _warned_env:
        for line in lines:
            print(line, file=sys.stderr, flush=True)
        _warned_env = True
    return lines


def engine_overrides(model: str, adapter: str | Path, *, alpha: float | None = None,
                     filter_ratio: float | None = None, mode: str | None = None,
                     request_policy: str | None = None,
                     alpha_range: tuple[float, float] | None = None,
                     rule: dict | None = None,
                     hf_overrides: dict | None = None,
                     additional_config: dict | None = None,
                     revision: str | None = None,
                     trust_remote_code: bool = False) -> tuple[dict, dict]:
    """Validate ``adapter`` against ``model``; return (hf_overrides, additional_config).

    This is where a ULD engine's settings are resolved, once: the arguments given here, then
    what ``additional_config["uld"]`` already holds (e.g. ``backend``), then the adapter's
    defaults. ``rule``: ``penalty``/``gate`` (``rule_settings``). The worker reads the result
    as it is."""
    from transformers import AutoConfig

    from uld_vllm.core.adapter import load_adapter

    warn_removed_env()
    ad = load_adapter(adapter)
    if ad.config.warning:
        print(f"uld-vllm: WARNING: adapter {adapter}: {ad.config.warning}", file=sys.stderr,
              flush=True)
    try:
        base = AutoConfig.from_pretrained(model, revision=revision,
                                          trust_remote_code=trust_remote_code)
    except OSError as exc:
        raise UldError(f"cannot read the config of model {model!r} ({str(exc).splitlines()[0]})",
                       "pass a local model folder or a hub id that is reachable") from None
    ad.check_base(base, str(model))
    archs = list(getattr(base, "architectures", None) or [])
    arch = archs[0] if archs else ""
    if arch not in ULD_ARCHITECTURES:
        raise UldError(f"model {model!r} has architecture {arch or 'unknown'}, which ULD does "
                       "not support", f"supported: {', '.join(ULD_ARCHITECTURES)}")
    extra: dict[str, Any] = dict(additional_config or {})
    given = dict(extra.get("uld") or {})
    given.pop("adapter_hash", None)
    given["adapter"] = str(Path(adapter).resolve())
    for key, value in (("alpha", alpha), ("filter_ratio", filter_ratio), ("mode", mode),
                       ("request_policy", request_policy), ("alpha_range", alpha_range)):
        if value is not None:
            given[key] = value
    given.update(rule or {})
    settings = UldSettings.from_dict(given, ad.config)
    hf = dict(hf_overrides or {})
    if "architectures" in hf and hf["architectures"] != [ULD_ARCHITECTURES[arch]]:
        raise UldError("--hf-overrides sets 'architectures', which --uld-adapter also sets",
                       "drop 'architectures' from --hf-overrides")
    hf["architectures"] = [ULD_ARCHITECTURES[arch]]
    extra["uld"] = settings.to_dict()
    # vLLM keys its compile cache on the config's hash, additional_config included; the
    # compiled ULD graph depends on the adapter's K and LoRA shapes, so an adapter rewritten
    # in place must not reuse a graph compiled for its former self
    extra["uld"]["adapter_hash"] = _adapter_hash(ad)
    return hf, extra


def _adapter_hash(ad) -> str:
    import hashlib

    h = hashlib.sha256()
    for f in sorted(Path(ad.path).glob("*.json")):
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    st = Path(ad.weights_file).stat()
    h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def settings_of(vllm_config) -> UldSettings | None:
    """The ``UldSettings`` of a built engine config (any process); None for a plain engine.

    A config written by ``engine_overrides`` holds every value; one written by hand may leave
    ``alpha``/``filter_ratio`` to the adapter, whose config is then read."""
    archs = set(getattr(vllm_config.model_config, "architectures", None) or [])
    if not archs & set(ULD_ARCHITECTURES.values()):
        return None
    raw = (vllm_config.additional_config or {}).get("uld")
    adapter_config = None
    if isinstance(raw, dict) and "adapter" in raw and not {"alpha", "filter_ratio"} <= set(raw):
        from uld_vllm.core.adapter import load_adapter

        adapter_config = load_adapter(raw["adapter"]).config
    return UldSettings.from_dict(raw, adapter_config)


def check_engine_options(*, enable_lora=False, speculative_config=None,
                         pipeline_parallel_size=1, enable_batch_sharded_sampling=None) -> None:
    """Refuse, with one line, the vLLM features the ULD model cannot serve correctly."""
    if enable_lora:
        raise UldError("--enable-lora cannot be combined with --uld-adapter: vLLM's LoRA "
                       "layers would apply its adapters to the target and the assistant "
                       "streams alike", "serve the LoRA-merged target with --uld-adapter, or "
                       "drop --enable-lora")
    if speculative_config:
        raise UldError("speculative decoding (--speculative-config) cannot be combined with "
                       "--uld-adapter: its drafts are verified against the target's logits, "
                       "not the ULD distribution", "drop --speculative-config")
    if (pipeline_parallel_size or 1) > 1:
        raise UldError("ULD does not support pipeline parallelism",
                       "use tensor parallelism (--tensor-parallel-size) instead")
    if enable_batch_sharded_sampling:
        raise UldError("--enable-batch-sharded-sampling gives each rank one vocabulary shard "
                       "of the logits; ULD's filter needs the whole row",
                       "drop --enable-batch-sharded-sampling")


def check_vllm_config(vllm_config) -> None:
    """``check_engine_options`` on a built config (engines made in the plain-vLLM form)."""
    check_engine_options(
        enable_lora=vllm_config.lora_config is not None,
        speculative_config=vllm_config.speculative_config,
        pipeline_parallel_size=vllm_config.parallel_config.pipeline_parallel_size,
        enable_batch_sharded_sampling=getattr(vllm_config.parallel_config,
                                              "enable_batch_sharded_sampling", None))
    if vllm_config.use_v2_model_runner:
        raise UldError(_V2_PROBLEM, _V2_FIX)


_V2_PROBLEM = ("ULD runs on vLLM's V1 model runner (its per-request controls are a V1 logits "
               "processor that sees the batch before the forward); this engine chose Model "
               "Runner V2")
_V2_FIX = ("set VLLM_USE_V2_MODEL_RUNNER=0 (uld_vllm.LLM and --uld-adapter do it when it is "
           "unset)")


_RUNNER_ENV = "VLLM_USE_V2_MODEL_RUNNER"


def _check_runner_env() -> bool:
    """True when the user left the runner choice to us; an explicit V2 is refused."""
    raw = os.environ.get(_RUNNER_ENV)
    if raw is None or not raw.strip():
        return True
    try:
        v2 = bool(int(raw))
    except ValueError:
        v2 = raw.strip().lower() == "true"
    if v2:
        raise UldError(f"{_RUNNER_ENV}={raw}: " + _V2_PROBLEM.split(";")[0],
                       f"unset {_RUNNER_ENV} or set it to 0")
    return False


@contextlib.contextmanager
def v1_model_runner():
    """Build an engine on the V1 model runner without changing the process for later engines.

    vLLM has no engine argument for the runner: it reads ``VLLM_USE_V2_MODEL_RUNNER`` when it
    builds the engine config, here and in the engine-core process it spawns (which inherits the
    environment at that moment). So the variable is set only while the engine is being built
    and removed afterwards: a plain engine built later in the same process picks its runner as
    vLLM would."""
    if not _check_runner_env():
        yield
        return
    os.environ[_RUNNER_ENV] = "0"
    try:
        yield
    finally:
        os.environ.pop(_RUNNER_ENV, None)


def v1_model_runner_for_server() -> None:
    """``vllm serve --uld-adapter``: the server process exists for this one ULD engine, whose
    core process starts after argument parsing, so the choice is made process-wide (and said)."""
    if _check_runner_env():
        os.environ[_RUNNER_ENV] = "0"
        print(f"uld-vllm: {_RUNNER_ENV}=0 for this server (ULD runs on vLLM's V1 model "
              "runner)", file=sys.stderr, flush=True)


def with_request_controls(logits_processors) -> list:
    """``logits_processors`` plus the ULD per-request processor (once)."""
    from uld_vllm.engine.request_controls import FQCN

    procs = list(logits_processors or [])
    if FQCN not in procs:
        procs.append(FQCN)
    return procs
