"""The ULD adapter folder: a standard PEFT LoRA folder plus ``uld_config.json``.

Layout::

    DIR/adapter_config.json         PEFT LoraConfig (LoRA on layers < K only)
    DIR/adapter_model.safetensors   LoRA A/B weights, nothing else
    DIR/uld_config.json             UldConfig below

No base weights are stored: the assistant is rebuilt from the target's first K layers.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from uld_vllm.core.logits import DEFAULT_GATE, DEFAULT_PENALTY
from uld_vllm.errors import UldError

ULD_CONFIG_NAME = "uld_config.json"
PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHT_NAMES = ("adapter_model.safetensors", "adapter_model.bin")
FORMAT_VERSION = 1
LORA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# Config fields that change the computation; two bases agreeing on all of them can share an
# adapter's shapes. Serving knobs (max_position_embeddings, rope_scaling, dtype) are left out
# on purpose: users change those at deploy time without changing the weights.
_FINGERPRINT_FIELDS = (
    "model_type",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_act",
    "rms_norm_eps",
    "rope_theta",
    "tie_word_embeddings",
)


@dataclasses.dataclass
class UldConfig:
    base_model: str = dataclasses.field(metadata={"help": "hub id or path of the target model"})
    base_fingerprint: str = dataclasses.field(metadata={"help": "config_fingerprint(target)"})
    num_layers: int = dataclasses.field(metadata={"help": "K: the assistant is layers [0, K)"})
    base_num_layers: int = dataclasses.field(metadata={"help": "N: layers of the target"})
    alpha: float = dataclasses.field(default=1.0, metadata={"help": "default ULD weight"})
    filter_ratio: float = dataclasses.field(
        default=0.1, metadata={"help": "default plausibility-filter ratio r"}
    )
    # the decoding rule's defaults (uld_vllm.core.logits); adapters written before these
    # existed decode with the current defaults
    penalty: str = DEFAULT_PENALTY
    gate: list | None = dataclasses.field(default_factory=lambda: list(DEFAULT_GATE))
    base_architecture: str = ""
    format_version: int = FORMAT_VERSION
    # how training ended (uld-vllm train): {"converged": bool, "forget_loss", "retain_kl",
    # "targets", "warning": str | None, ...}; None for adapters made otherwise
    training: dict | None = None

    @property
    def warning(self) -> str | None:
        """A one-line warning when training missed its targets (eval and serve print it)."""
        t = self.training or {}
        if t.get("converged") is False:
            return t.get("warning") or "the adapter did not reach its training targets"
        return None

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True) + "\n"


def config_fingerprint(config: Any) -> str:
    """sha256 (16 hex digits) of the fields of a HF config (object or dict) that fix the maths."""
    d = config if isinstance(config, dict) else config.to_dict()
    d = {**d.get("text_config", {}), **d} if "text_config" in d else d
    picked = {f: d.get(f) for f in _FINGERPRINT_FIELDS}
    if picked["rope_theta"] is None:  # transformers >= 5 keeps it in rope_parameters
        picked["rope_theta"] = (d.get("rope_parameters") or {}).get("rope_theta")
    if picked["num_key_value_heads"] is None:
        picked["num_key_value_heads"] = picked["num_attention_heads"]
    if picked["head_dim"] is None and picked["hidden_size"] and picked["num_attention_heads"]:
        picked["head_dim"] = picked["hidden_size"] // picked["num_attention_heads"]
    blob = json.dumps(picked, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


@dataclasses.dataclass
class UldAdapter:
    """A validated adapter folder."""

    path: Path
    config: UldConfig
    peft_config: dict
    weights_file: Path

    def check_base(self, base_config: Any, base_name: str | None = None) -> None:
        """Refuse a target the adapter was not trained for (one-line UldError)."""
        d = base_config if isinstance(base_config, dict) else base_config.to_dict()
        n = d.get("num_hidden_layers") or d.get("text_config", {}).get("num_hidden_layers")
        got = config_fingerprint(base_config)
        if got != self.config.base_fingerprint:
            raise UldError(
                f"adapter {self.path} was trained for base model {self.config.base_model!r} "
                f"(config fingerprint {self.config.base_fingerprint}), but the model "
                f"{base_name or 'given'} has fingerprint {got}",
                f"serve it with {self.config.base_model!r} or train an adapter for this model",
            )
        if n is not None and self.config.num_layers >= n:
            raise UldError(
                f"adapter {self.path} uses K={self.config.num_layers} assistant layers but the "
                f"model has only {n}",
                f"use an adapter with K < {n}",
            )


# resolved folder -> (its files' names, sizes and mtimes, the adapter read from them)
_LOADED: dict[Path, tuple[tuple, UldAdapter]] = {}


def load_adapter(path: str | os.PathLike) -> UldAdapter:
    """Read and validate an adapter folder; every problem is a one-line UldError.

    Read once per process: the entry point, the worker and the jobs all ask for it, and the
    weights' keys are checked by reading the file. A folder rewritten since is read again."""
    path = Path(path)
    if not path.is_dir():
        raise UldError(f"ULD adapter folder {path} does not exist", "pass the folder that "
                       "`uld-vllm train` wrote (it holds uld_config.json)")
    stamp = tuple(sorted((f.name, st.st_size, st.st_mtime_ns) for f in path.iterdir()
                         if f.is_file() for st in [f.stat()]))
    cached = _LOADED.get(path.resolve())
    if cached is None or cached[0] != stamp:
        cached = (stamp, _read_adapter(path))
        _LOADED[path.resolve()] = cached
    # a copy each time: a caller that changes its adapter's settings changes no one else's
    return copy.deepcopy(dataclasses.replace(cached[1], path=path))


def _read_adapter(path: Path) -> UldAdapter:
    uld = _read_json(path / ULD_CONFIG_NAME, "ULD config")
    fields = {f.name for f in dataclasses.fields(UldConfig)}
    unknown = sorted(set(uld) - fields)
    missing = sorted(f for f in ("base_model", "base_fingerprint", "num_layers",
                                 "base_num_layers") if f not in uld)
    if unknown or missing:
        raise UldError(f"{path / ULD_CONFIG_NAME} is malformed (missing {missing}, unknown "
                       f"{unknown})", "re-export the adapter with this version of uld-vllm")
    cfg = UldConfig(**uld)
    if cfg.format_version > FORMAT_VERSION:
        raise UldError(f"{path} has adapter format {cfg.format_version}, newer than this "
                       f"uld-vllm understands ({FORMAT_VERSION})", "upgrade uld-vllm")
    if not (isinstance(cfg.num_layers, int) and 0 < cfg.num_layers < cfg.base_num_layers):
        raise UldError(f"{path / ULD_CONFIG_NAME}: num_layers={cfg.num_layers} must be an "
                       f"integer in [1, {cfg.base_num_layers})", "fix or re-train the adapter")
    peft = _read_json(path / PEFT_CONFIG_NAME, "PEFT adapter config")
    if peft.get("peft_type", "LORA") != "LORA":
        raise UldError(f"{path / PEFT_CONFIG_NAME} is a {peft.get('peft_type')} adapter",
                       "ULD adapters are LoRA adapters; re-train with `uld-vllm train`")
    weights = next((path / n for n in PEFT_WEIGHT_NAMES if (path / n).is_file()), None)
    if weights is None:
        raise UldError(f"{path} holds no adapter weights ({' or '.join(PEFT_WEIGHT_NAMES)})",
                       "copy the whole adapter folder")
    _check_lora_keys(weights, cfg.num_layers)
    return UldAdapter(path=path, config=cfg, peft_config=peft, weights_file=weights)


# A PEFT LoRA tensor name: layer index, block, projection, A or B (the engine loads by it too)
LORA_KEY = re.compile(r"layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.\w+)?\.weight$")


def _check_lora_keys(weights: Path, num_layers: int) -> None:
    keys = _tensor_names(weights)
    if not keys:
        raise UldError(f"{weights} holds no tensors", "re-export the adapter")
    for key in keys:
        m = LORA_KEY.search(key)
        if m is None or m.group(3) not in LORA_MODULES:
            raise UldError(
                f"{weights} has LoRA weights on an unexpected module ({key})",
                f"ULD adapters may only adapt {', '.join(LORA_MODULES)} of layers < K",
            )
        if int(m.group(1)) >= num_layers:
            raise UldError(f"{weights} adapts layer {m.group(1)} but K={num_layers}",
                           "LoRA must be on layers < K only; re-train the adapter")


def _tensor_names(weights: Path) -> list[str]:
    try:
        if weights.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(weights), framework="pt") as f:
                return list(f.keys())
        import torch

        return list(torch.load(weights, map_location="cpu", weights_only=True).keys())
    except Exception as exc:  # corrupt file: the library's message is multi-line noise
        raise UldError(f"cannot read adapter weights {weights} ({type(exc).__name__})",
                       "the file is corrupt or truncated; copy it again") from None


def _read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise UldError(f"{path} is missing ({what})",
                       "pass a complete adapter folder written by `uld-vllm train`")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UldError(f"{path} is not valid JSON ({exc.msg if hasattr(exc, 'msg') else exc})",
                       "the file is corrupt; copy it again") from None
    if not isinstance(data, dict):
        raise UldError(f"{path} must hold a JSON object", "the file is corrupt; copy it again")
    return data


@contextmanager
def atomic_output_dir(final: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder that becomes ``final`` only if the block succeeds.

    On any error the temporary folder is removed, so ``final`` never holds half-written output.
    """
    final = Path(final)
    if final.exists() and any(final.iterdir()) and not overwrite:
        raise UldError(f"output folder {final} already exists and is not empty",
                       "choose another --output or pass --overwrite")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    # mkdtemp makes the folder 0700; adapters are often served by another user
    tmp.chmod(0o755)
    for f in tmp.rglob("*"):
        f.chmod(0o755 if f.is_dir() else 0o644)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


def write_uld_config(folder: Path, cfg: UldConfig) -> None:
    (folder / ULD_CONFIG_NAME).write_text(cfg.to_json())
