"""`uld-vllm bench ab`: two engine variants, alive together, taking turns on the same decode.

A variant is a system (``plain`` vLLM or the ``uld`` engine) and, optionally, environment
variables its engine starts with, e.g. ``--a "uld ULD_NATIVE=0" --b uld`` (the torch combine
against the C one) or ``--a plain --b uld``. Both engines are alive in this process at once
and run every repeat of every batch one after the other, the first to go alternating, so that
the machine's drift and the engine-instance variance of a sequential run land on both; each
repeat is also reported against its neighbour. ``--a X --b X`` (an A/A run) shows the noise.

What one pair of engines cannot average out is the pair itself: the same code has run up to
~10 % apart between engine starts on a VM (memory placement, it seems). ``--instances N``
starts N pairs one after the other, each running every repeat; B / A is then the median of
the N pairs' ratios, each pair's ratio is reported too, and the paired repeats of all pairs.

The variables reach only the engine they are given for: each vLLM engine runs in its own
processes, which copy the environment when the engine starts (the combine reads ``ULD_NATIVE``,
``ULD_BACKEND`` and ``ULD_SPARSE_HEAD_FRACTION`` there, the model ``ULD_HOST_MALLOC``), and this
process restores its own right after. Variables read only when a process starts
(``PYTHONPATH``, ``LD_PRELOAD``, ...) are refused: the engines' processes are forked from this
one and would not see them. Writes ``ab.json`` and ``ab.png`` to ``--out`` and prints a table.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import statistics
import time

from uld_vllm.bench import common
from uld_vllm.bench.throughput import paired_ratios, run_interleaved, start_engine, stop_engine
from uld_vllm.errors import UldError
from uld_vllm.jobs.spec import environment

SYSTEMS = ("plain", "uld")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# read when a process starts its interpreter or loader: vLLM forks its engine processes by
# default, and a forked process keeps this one's imports and libraries, so such a variable
# would silently not apply (an A/B of two code versions by PYTHONPATH measured A against A)
_STARTUP_ONLY = ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "LD_PRELOAD", "LD_LIBRARY_PATH")


def parse_variant(text: str, flag: str) -> dict:
    """``"uld ULD_NATIVE=0"`` -> ``{"spec": ..., "system": "uld", "env": {"ULD_NATIVE": "0"}}``."""
    try:
        words = shlex.split(text)
    except ValueError as e:  # an unclosed quote
        raise UldError(f"{flag} {text!r} cannot be split into words ({e})",
                       "close its quotes") from None
    if not words or words[0] not in SYSTEMS:
        raise UldError(f"{flag} {text!r} does not start with a system",
                       f"start it with {' or '.join(SYSTEMS)}, e.g. {flag} \"uld ULD_NATIVE=0\"")
    env = {}
    for word in words[1:]:
        name, eq, value = word.partition("=")
        if not eq or not _ENV_NAME.fullmatch(name):
            raise UldError(f"{flag} {text!r}: {word!r} is not NAME=VALUE",
                           "give environment variables as NAME=VALUE after the system")
        if name in _STARTUP_ONLY:
            raise UldError(f"{flag} {text!r}: {name} would not reach the engine (vLLM forks "
                           "its engine processes from this one, which has already imported "
                           "and loaded what it names)",
                           f"set {name} for the whole command and run each version as its "
                           "own command, or switch the two versions by a variable read at "
                           "run time")
        env[name] = value
    return {"spec": text, "system": words[0], "env": env}


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="uld-vllm bench ab",
                                description=__doc__.split("\n\n")[0].split(": ", 1)[1],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    common.add_bench_model_args(p)
    v = p.add_argument_group("variants")
    v.add_argument("--a", default="plain",
                   help="variant A: plain or uld, then NAME=VALUE environment variables")
    v.add_argument("--b", default="uld", help="variant B, as --a")
    w = p.add_argument_group("workload")
    w.add_argument("--batches", type=int, nargs="+", default=[1, 32], help="decode batch sizes")
    w.add_argument("--new-tokens", type=int, default=64, help="tokens per request (ignore_eos)")
    w.add_argument("--prompt-tokens", type=int, default=32)
    w.add_argument("--repeats", type=int, default=5,
                   help="timed runs per variant and batch (the median is reported)")
    w.add_argument("--instances", type=int, default=1,
                   help="engine pairs started one after the other, each running every "
                        "repeat (B / A: the median of the pairs' ratios)")
    w.add_argument("--max-num-seqs", type=int, default=None, help="default: vLLM's")
    w.add_argument("--no-eager", action="store_true",
                   help="let vLLM compile both engines (default: enforce_eager)")
    a = p.parse_args(argv)
    for name in ("new_tokens", "prompt_tokens", "repeats", "instances"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if min(a.batches) < 1:
        p.error("--batches must be >= 1")
    try:
        a.variants = {"a": parse_variant(a.a, "--a"), "b": parse_variant(a.b, "--b")}
    except UldError as e:
        p.error(str(e))
    env_given = any(v["env"] for v in a.variants.values())
    if env_given and os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "1") == "0":
        p.error("VLLM_ENABLE_V1_MULTIPROCESSING=0 runs both engines in this process, where a "
                "variant's environment would reach the other one too; unset it")
    return a


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    log = print
    out, bind, load_before, m, facts = common.offline_setup(args, log)
    prompts = common.fixed_prompts(m["model"], max(args.batches), args.prompt_tokens)
    loads = [{"name": f"decode_b{b}", "kind": "decode", "batch": b,
              "max_tokens": args.new_tokens, "ignore_eos": True, "prompts": prompts[:b],
              "repeats": args.repeats} for b in args.batches]
    max_seqs = args.max_num_seqs or 256  # vLLM's CPU default for the offline LLM
    need = min(max(args.batches), max_seqs) * (args.prompt_tokens + args.new_tokens)
    kv = common.set_kv_cache(args, facts, need)
    log(f"model {m['model']}, adapter {m['adapter']} (K={facts['k']}); {args.dtype}; "
        f"{'compiled' if args.no_eager else 'eager'}; threads: {bind['vllm']}; KV cache "
        f"{kv[0]} GiB ({kv[1]})")

    kw = dict(dtype=args.dtype, max_model_len=args.prompt_tokens + args.new_tokens + 16,
              enforce_eager=not args.no_eager, seed=0)
    if args.max_num_seqs:
        kw["max_num_seqs"] = args.max_num_seqs
    uld_kw = dict(uld_adapter=m["adapter"], uld_alpha=args.uld_alpha,
                  uld_filter_ratio=args.uld_filter_ratio)
    instances = []
    for i in range(args.instances):
        if args.instances > 1:
            log(f"engine pair {i + 1} of {args.instances}")
        instances.append(_run_pair(args, m, kw, uld_kw, loads, log))
    rows = summarize(loads, instances)
    first = instances[0]
    report = {"benchmark": "ab", "machine": common.machine_info(), "threads": bind,
              "kv_cache_gib": kv[0], "kv_cache_source": kv[1], "dtype": args.dtype,
              "compiled": args.no_eager, "model": {**m, **facts},
              "memory_method": common.PeakRSS.METHOD,
              "instances": args.instances,
              # the first pair's engines; every pair's in by_instance
              "variants": {n: {**v, **first["systems"][n],
                               "combiner": first["combiners"].get(n),
                               "host_malloc": None,
                               "by_instance": [{**p["systems"][n],
                                                "combiner": p["combiners"].get(n),
                                                "host_malloc": None}
                                               for p in instances]}
                           for n, v in args.variants.items()},
              "workloads": rows, "config": {k: v for k, v in vars(args).items()
                                            if k != "variants"},
              "load_average": {"before": load_before, "after": common.load_average()},
              "wall_s": round(time.perf_counter() - t_start, 1)}
    common.write_json(out / "ab.json", report)
    from uld_vllm.bench.report import ab_chart, ab_table

    ab_chart(report, out / "ab.png")
    print(ab_table(report))
    print(f"wrote {out / 'ab.json'} and {out / 'ab.png'}")
    return 0


def _run_pair(args, m, kw, uld_kw, loads, log) -> dict:
    """Start A and B, run every workload's repeats on both in turn, stop both."""
    from vllm import LLM as PlainLLM
    from vllm import SamplingParams

    import uld_vllm

    engines = []
    for name, v in args.variants.items():
        def make(v=v):
            with environment(v["env"]):
                if v["system"] == "plain":
                    return PlainLLM(m["model"], **kw)
                return uld_vllm.LLM(m["model"], **uld_kw, **kw)

        log(f"{name} = {v['spec']}: starting the engine")
        engines.append(start_engine(name, make, loads, log))
    # one untimed run of every batch on each engine: first-call costs (allocations, the
    # compiled graph's first shapes) stay out of the first timed repeat
    for e in engines:
        for w in loads:
            e["llm"].generate([{"prompt_token_ids": p} for p in w["prompts"]],
                              SamplingParams(max_tokens=w["max_tokens"], temperature=0.0,
                                             ignore_eos=True), use_tqdm=False)
    results, outputs = run_interleaved(engines, loads, log)
    # what each ULD engine ran, from its worker: the combine path its environment chose and
    # how many steps took each path (so a variable that did not take effect shows here)
    ulds = [e for e, v in zip(engines, args.variants.values()) if v["system"] == "uld"]
    combiners = {e["name"]: e["llm"].collective_rpc("uld_combiner_state")[0] for e in ulds}
    host_malloc = {}
    systems = {e["name"]: stop_engine(e) for e in engines}
    return {"results": results, "outputs": outputs, "combiners": combiners,
            "host_malloc": host_malloc, "systems": systems}


def summarize(loads: list[dict], instances: list[dict]) -> list[dict]:
    """One row per workload from every engine pair's results and outputs.

    Per pair, B / A is the ratio of the two medians; over pairs, ``b_over_a`` is the median of
    those (one pair: that pair's). ``results`` are the first pair's; ``paired_b_over_a`` lists
    every repeat against its neighbour, pair after pair; ``greedy_same`` counts the prompts of
    every pair."""
    rows = []
    for w in loads:
        name = w["name"]
        by_pair = [{"results": {"a": p["results"]["a"][name], "b": p["results"]["b"][name]}}
                   for p in instances]
        for q in by_pair:
            ra, rb = q["results"]["a"], q["results"]["b"]
            q["b_over_a"] = rb["tokens_per_s"] / ra["tokens_per_s"]
            q["paired_b_over_a"] = paired_ratios(rb, ra)
        rows.append({
            "name": name, "kind": "decode", "batch": w["batch"],
            "max_tokens": w["max_tokens"], "repeats": w["repeats"],
            "results": by_pair[0]["results"],
            "b_over_a": statistics.median(q["b_over_a"] for q in by_pair),
            "b_over_a_by_instance": [q["b_over_a"] for q in by_pair],
            "paired_b_over_a": [x for q in by_pair for x in q["paired_b_over_a"]],
            # greedy on both: whether the two variants wrote the same tokens (a code change
            # that should not change the output, e.g. the C combine for the torch one)
            "greedy_same": common.same_fraction(
                [o for p in instances for o in p["outputs"]["a"][name]],
                [o for p in instances for o in p["outputs"]["b"][name]])})
    return rows
