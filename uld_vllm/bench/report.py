"""Terminal tables and PNG charts (matplotlib, Agg) for the benchmark results."""

from __future__ import annotations

from pathlib import Path

LABELS = {"plain": "plain vLLM", "uld": "ULD engine", "reference_b4": "reference b4",
          "reference_vllm_batch": "reference vLLM-batch"}
COLORS = {"plain": "#4c72b0", "uld": "#dd8452", "reference_b4": "#55a868",
          "reference_vllm_batch": "#8172b3"}


def table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) if i == 0 else h.rjust(w)
                     for i, (h, w) in enumerate(zip(headers, widths)))
    out = [line, "-" * len(line)]
    for r in rows:
        out.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                             for i, (c, w) in enumerate(zip(r, widths))))
    return "\n".join(out)


def workload_label(w: dict) -> str:
    if w["kind"] == "decode":
        return f"decode b{w['batch']} x{w['max_tokens']}"
    return f"eval {w['prompts']}q <={w['max_tokens']}"


def throughput_table(rep: dict) -> str:
    headers = ["workload", "plain tok/s", "ULD tok/s", "ref b4 tok/s", "ref vLLM-b tok/s",
               "ULD/plain", "ULD/ref b4", "ULD/ref vLLM-b"]
    rows = []
    for w in rep["workloads"]:
        r = w["results"]
        ref_b = r["reference_vllm_batch"]["batch"]
        label = workload_label(w)
        if w["kind"] == "eval" and w["reference_prompts"] < w["prompts"]:
            label += f" (ref: first {w['reference_prompts']})"
        rows.append([label, *(f"{r[s]['tokens_per_s']:.1f}" for s in ("plain", "uld",
                                                                       "reference_b4")),
                     f"{r['reference_vllm_batch']['tokens_per_s']:.1f} (b{ref_b})",
                     *(f"{w['ratios'][k]:.3f}" for k in ("uld_over_plain",
                                                         "uld_over_reference_b4",
                                                         "uld_over_reference_vllm_batch"))])
    m, t, s = rep["model"], rep["threads"], rep["systems"]
    compiled = ""
    if any("compiled" in w for w in rep["workloads"]):
        crows = [[workload_label(w), f"{w['results']['plain']['tokens_per_s']:.1f}",
                  f"{w['compiled']['results']['plain_compiled']['tokens_per_s']:.1f}",
                  f"{w['results']['uld']['tokens_per_s']:.1f}",
                  f"{w['compiled']['results']['uld_compiled']['tokens_per_s']:.1f}",
                  f"{w['ratios']['uld_over_plain']:.3f}",
                  f"{w['compiled']['uld_over_plain']:.3f}",
                  f"{w['compiled']['uld_greedy_same_as_eager']:.2f}"]
                 for w in rep["workloads"]]
        compiled = "\n" + table(["workload", "plain eager", "plain compiled", "ULD eager",
                                 "ULD compiled", "ULD/plain eager", "ULD/plain compiled",
                                 "ULD greedy same"], crows) + "\n"
    lines = [
        "",
        f"machine: {rep['machine']['cpu']} ({rep['machine']['logical_cpus']} logical CPUs"
        + (f", GPU {rep['machine']['gpu']}" if "gpu" in rep["machine"] else "") + f"), "
        f"{rep['dtype']}, vLLM {rep['machine']['vllm']}, torch {rep['machine']['torch']}",
        f"model: {m['model']} ({m.get('parameters') or '?'} parameters; hidden {m['hidden']}, "
        f"{m['layers']} layers, vocab {m['vocab']}); ULD K={m['k']}, alpha {m['alpha']}, "
        f"filter ratio {m['filter_ratio']}",
        f"threads: {t['threads']}"
        + (f", front-end on cores {t['frontend_cores']}" if t.get("frontend_cores") else "")
        + f" (VLLM_CPU_OMP_THREADS_BIND={t['VLLM_CPU_OMP_THREADS_BIND']}, "
        f"VLLM_CPU_NUM_OF_RESERVED_CPU={t['VLLM_CPU_NUM_OF_RESERVED_CPU']}; reference: "
        f"{t['reference']}); KV cache {rep['kv_cache_gib']} GiB",
        "",
        table(headers, rows),
        compiled,
        "peak RSS, front-end process + that engine's processes (MiB): " + ", ".join(
            f"{LABELS[k]} {s[k]['peak_rss_mib']:.0f}" for k in ("plain", "uld", "reference_b4"))
        + " (both reference runs share one process phase)",
        "engine/model start (s): " + ", ".join(
            f"{LABELS[k]} {s[k]['start_s']:.1f}" for k in ("plain", "uld", "reference_b4")),
    ]
    for w in rep["workloads"]:
        line = (f"{workload_label(w)}: ULD greedy output identical to the reference on "
                f"{w['uld_greedy_same_as_reference']:.0%} of prompts")
        if w.get("reference_greedy_same_across_batches") is not None:
            line += (f" (the reference's own outputs at its two batch sizes: identical on "
                     f"{w['reference_greedy_same_across_batches']:.0%})")
        lines.append(line)
    lines += paired_lines(rep)
    for label, tgt in rep["targets"].items():
        mode = f" ({tgt['mode']})" if "mode" in tgt else ""
        lines.append(f"target {label}{mode} >= {tgt['target']}: measured {tgt['measured']:.3f}"
                     f" -> {'MET' if tgt['met'] else 'MISSED'}")
    la = rep["load_average"]
    lines.append(f"load average before {la['before']}, after {la['after']}; wall "
                 f"{rep['wall_s']:.0f} s")
    return "\n".join(lines)


def paired_lines(rep: dict) -> list[str]:
    """The spread of the interleaved repeats: how far one repeat's ratio is from the median.
    The main runs are eager unless ``--no-eager`` made them compiled; ``--compiled`` adds a
    compiled set beside eager ones."""
    main_mode = "compiled" if rep.get("config", {}).get("no_eager") else "eager"
    lines = []
    for w in rep["workloads"]:
        for mode, paired in ((main_mode, w.get("paired_uld_over_plain")),
                             ("compiled", w.get("compiled", {}).get("paired_uld_over_plain"))):
            if paired:
                lines.append(f"{workload_label(w)} ULD/plain {mode}, each repeat against the "
                             f"plain run beside it: " + ", ".join(f"{x:.3f}" for x in paired))
    return lines


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def throughput_chart(rep: dict, path: Path) -> None:
    plt = _plt()
    loads = rep["workloads"]
    fig, (ax, mx) = plt.subplots(1, 2, figsize=(5 + 2.2 * len(loads), 5.2),
                                 gridspec_kw={"width_ratios": [max(2, len(loads)), 1.3]})
    width = 0.2
    for j, s in enumerate(LABELS):
        xs = [i + (j - 1.5) * width for i in range(len(loads))]
        ax.bar(xs, [w["results"][s]["tokens_per_s"] for w in loads], width, label=LABELS[s],
               color=COLORS[s])
    top = max(w["results"][s]["tokens_per_s"] for w in loads for s in LABELS)
    for i, w in enumerate(loads):
        ax.text(i, top * 1.04, f"ULD/plain {w['ratios']['uld_over_plain']:.2f}\n"
                f"ULD/ref b4 {w['ratios']['uld_over_reference_b4']:.1f}x",
                ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(loads)), [workload_label(w) for w in loads], fontsize=8)
    ax.set_ylabel("generated tokens / s")
    ax.set_ylim(0, top * 1.25)
    ax.legend(fontsize=8, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.08))
    ax.set_title(f"throughput, {rep['threads']['threads']} thread(s), {rep['dtype']}",
                 fontsize=10)
    names = ["plain", "uld", "reference_b4"]
    mx.bar(range(3), [rep["systems"][s]["peak_rss_mib"] for s in names],
           color=[COLORS[s] for s in names])
    mx.set_xticks(range(3), ["plain", "ULD", "reference"], fontsize=8)
    mx.set_ylabel("peak RSS incl. children (MiB)")
    mx.set_title("memory", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


SERVING_SYSTEMS = {"plain": "plain server", "uld": "--uld-adapter server"}


def serving_table(rep: dict) -> str:
    headers = ["server", "req/s", "out tok/s", "TTFT p50 ms", "TTFT p99 ms", "TPOT p50 ms",
               "TPOT p99 ms", "peak RSS MiB"]
    rows = []
    for s, label in SERVING_SYSTEMS.items():
        r = rep["systems"][s]
        rows.append([label, f"{r['request_throughput_rps']:.2f}",
                     f"{r['output_tokens_per_s']:.1f}",
                     *(f"{r[m][q]:.1f}" for m in ("ttft_ms", "tpot_ms") for q in ("p50", "p99")),
                     f"{r['peak_rss_mib']:.0f}"])
    c, t = rep["load"], rep["threads"]
    return "\n".join([
        "",
        f"machine: {rep['machine']['cpu']} ({rep['machine']['logical_cpus']} logical CPUs), "
        f"{rep['dtype']}; threads: {t['threads']} (VLLM_CPU_OMP_THREADS_BIND="
        f"{t['VLLM_CPU_OMP_THREADS_BIND']}); KV cache {rep['kv_cache_gib']} GiB",
        f"load: {c['requests']} streaming /v1/completions requests, {c['concurrency']} at a "
        f"time, {c['max_tokens']} tokens each (ignore_eos, greedy), prompts: {c['prompts']}",
        "",
        table(headers, rows),
        "",
        f"ULD / plain: request throughput {rep['ratios']['request_throughput']:.3f}, TPOT p50 "
        f"{rep['ratios']['tpot_p50']:.3f}x, TTFT p50 {rep['ratios']['ttft_p50']:.3f}x",
        f"load average before {rep['load_average']['before']}, after "
        f"{rep['load_average']['after']}; wall {rep['wall_s']:.0f} s",
    ])


def serving_chart(rep: dict, path: Path) -> None:
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(10, 3.6))
    names = list(SERVING_SYSTEMS)
    colors = [COLORS[s] for s in names]
    axes[0].bar(names, [rep["systems"][s]["request_throughput_rps"] for s in names],
                color=colors)
    axes[0].set_title("requests / s", fontsize=10)
    for ax, metric, title in ((axes[1], "ttft_ms", "time to first token (ms)"),
                              (axes[2], "tpot_ms", "time per output token (ms)")):
        for j, q in enumerate(("p50", "p99")):
            ax.bar([i + (j - 0.5) * 0.38 for i in range(len(names))],
                   [rep["systems"][s][metric][q] for s in names], 0.38, label=q,
                   color=colors, alpha=1.0 if q == "p50" else 0.55)
        ax.set_xticks(range(len(names)), names)
        ax.set_title(title + "  (p50 | p99)", fontsize=10)
    fig.suptitle(f"serving: {rep['load']['requests']} requests at concurrency "
                 f"{rep['load']['concurrency']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def ab_table(rep: dict) -> str:
    import statistics

    va, vb = rep["variants"]["a"], rep["variants"]["b"]
    pairs = rep.get("instances", 1)
    headers = ["workload", "A tok/s", "B tok/s", "B/A", "B/A paired median", "paired min-max",
               "same greedy tokens"]
    if pairs > 1:
        headers[1:3] = ["A tok/s (pair 1)", "B tok/s (pair 1)"]
        headers.insert(4, "B/A by engine pair")
    rows = []
    for w in rep["workloads"]:
        r, paired = w["results"], w["paired_b_over_a"]
        rows.append([workload_label(w), f"{r['a']['tokens_per_s']:.1f}",
                     f"{r['b']['tokens_per_s']:.1f}", f"{w['b_over_a']:.3f}",
                     f"{statistics.median(paired):.3f}",
                     f"{min(paired):.3f}-{max(paired):.3f}", f"{w['greedy_same']:.0%}"])
        if pairs > 1:
            rows[-1].insert(4, " ".join(f"{x:.3f}" for x in w["b_over_a_by_instance"]))
    la = rep["load_average"]
    return "\n".join([
        "",
        f"machine: {rep['machine']['cpu']} ({rep['machine']['logical_cpus']} logical CPUs), "
        f"{rep['dtype']}, {'compiled' if rep['compiled'] else 'eager'}; threads: "
        f"{rep['threads']['threads']}; KV cache {rep['kv_cache_gib']} GiB",
        f"A = {va['spec']} (started in {va['start_s']:.0f} s, peak RSS {va['peak_rss_mib']:.0f} "
        f"MiB); B = {vb['spec']} (started in {vb['start_s']:.0f} s, peak RSS "
        f"{vb['peak_rss_mib']:.0f} MiB)",
        f"both alive, taking turns (the first alternating), median of "
        f"{rep['workloads'][0]['repeats']} runs each; paired: each B run against the A run "
        f"beside it"
        + (f"; {pairs} engine pairs one after the other, B/A the median of their ratios"
           if pairs > 1 else ""),
        "",
        table(headers, rows),
        "",
        *(f"{n.upper()} combine: {v['combiner']['description']}; steps by path "
          f"{v['combiner']['stats']}" for n, v in rep["variants"].items() if v["combiner"]),
        f"load average before {la['before']}, after {la['after']}; wall {rep['wall_s']:.0f} s",
    ])


def ab_chart(rep: dict, path: Path) -> None:
    """B / A of every repeat, per workload, with the ratio of the medians."""
    plt = _plt()
    loads = rep["workloads"]
    fig, ax = plt.subplots(figsize=(3 + 1.6 * len(loads), 4.2))
    for i, w in enumerate(loads):
        paired = w["paired_b_over_a"]
        ax.scatter([i] * len(paired), paired, color=COLORS["uld"], s=18, zorder=3,
                   label="one repeat against its neighbour" if i == 0 else None)
        by_pair = w.get("b_over_a_by_instance", [])
        if len(by_pair) > 1:
            ax.scatter([i + 0.15] * len(by_pair), by_pair, color=COLORS["plain"], marker="D",
                       s=22, zorder=3, label="one engine pair" if i == 0 else None)
        ax.hlines(w["b_over_a"], i - 0.3, i + 0.3, color=COLORS["plain"], lw=2,
                  label=("ratio of the medians" if len(by_pair) < 2
                         else "median of the pairs' ratios") if i == 0 else None)
        ax.text(i + 0.32, w["b_over_a"], f"{w['b_over_a']:.3f}", va="center", fontsize=8)
    ax.axhline(1.0, color="#999999", lw=0.8, ls="--")
    ax.set_xticks(range(len(loads)), [workload_label(w) for w in loads], fontsize=8)
    ax.set_xlim(-0.6, len(loads) - 0.1)
    ax.set_ylabel("B tokens/s / A tokens/s")
    va, vb = rep["variants"]["a"]["spec"], rep["variants"]["b"]["spec"]
    ax.set_title(f"A = {va}\nB = {vb}\n{rep['dtype']}, "
                 f"{'compiled' if rep['compiled'] else 'eager'}", fontsize=9)
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
