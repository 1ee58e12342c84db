"""Data-parallel engine replicas through Ray Data: ``--replicas N``.

Each replica is a Ray actor that builds one engine (possibly tensor-parallel) from an
``EngineSpec`` and runs batches of work items through ``jobs.stream.stream``; results flow back
to the caller as batches finish. Items carry their key, so the output does not depend on which
replica ran what (greedy decoding of a request is independent of what it was batched with).

On a GPU cluster Ray gives each replica ``tensor_parallel_size`` GPUs. On a CPU machine the
cores are split between replicas (vLLM's ``VLLM_CPU_OMP_THREADS_BIND`` per replica) unless
the user set that variable: N engines that each bind the same core would run one at a time.
"""

from __future__ import annotations

import json
import math
import os
import uuid
from collections.abc import Iterator

from uld_vllm.errors import UldError
from uld_vllm.jobs.spec import EngineSpec, set_uld_mode
from uld_vllm.jobs.stream import Job, Progress, result_tokens, stream


def _ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise UldError("--replicas needs Ray Data, which is not installed",
                       "pip install 'uld-vllm[ray]' (ray[data]), or drop --replicas") from None
    return ray


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:  # pragma: no cover
        return False


def cpu_binding(rank: int, replicas: int, tp: int, cpus: list[int]) -> str | None:
    """``VLLM_CPU_OMP_THREADS_BIND`` for CPU replica ``rank``: its own slice of the allowed
    cores, split further between its ``tp`` workers ("0-3|4-7"); None if there are too few."""
    per_worker = len(cpus) // (replicas * tp)
    if per_worker < 1:
        return None
    base = rank * tp * per_worker
    parts = []
    for w in range(tp):
        ids = cpus[base + w * per_worker: base + (w + 1) * per_worker]
        parts.append(",".join(str(i) for i in ids))
    return "|".join(parts)


class _Replica:
    """A Ray Data callable class: one engine per actor, built once, reused for every batch."""

    def __init__(self, spec: EngineSpec, jobs: list[Job], replicas: int, counter: str):
        import ray

        rank = ray.get(ray.get_actor(counter).next.remote())
        tp = int(spec.vllm_kwargs.get("tensor_parallel_size", 1))
        if not _cuda() and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
            bind = cpu_binding(rank, replicas, tp, sorted(os.sched_getaffinity(0)))
            if bind is not None:
                os.environ["VLLM_CPU_OMP_THREADS_BIND"] = bind
        self.jobs = jobs  # kinds, sampling and modes; the items travel in the batches
        self.llm = spec.build()
        self.mode = None

    def __call__(self, batch: dict) -> dict:
        by_job: dict[int, list[dict]] = {}
        for j, k, ids, s in zip(batch["job"], batch["key"], batch["prompt_token_ids"],
                                batch["start"]):
            by_job.setdefault(int(j), []).append(
                {"key": int(k), "prompt_token_ids": [int(t) for t in ids], "start": int(s)})
        out = []
        for j, items in sorted(by_job.items()):
            job = self.jobs[j]
            if job.mode is not None and job.mode != self.mode:
                set_uld_mode(self.llm, job.mode)
                self.mode = job.mode
            out += [json.dumps([j, r]) for r in stream(self.llm, job.kind, items, job.sampling)]
        return {"result": out}


def _counter_actor(ray, name: str):
    """Hands out replica ranks (Ray Data does not number its actors)."""

    @ray.remote(num_cpus=0)
    class Counter:
        def __init__(self):
            self.n = -1

        def next(self) -> int:
            self.n += 1
            return self.n

    return Counter.options(name=name).remote()


def run_replicated(spec: EngineSpec, jobs: list[Job], replicas: int,
                   progress: Progress | None = None) -> Iterator[tuple[int, dict]]:
    """Run every job's items on ``replicas`` engines (built once, for all jobs); yields
    ``(job index, result)`` as batches finish."""
    ray = _ray()
    rows = [{"job": j, "key": int(it["key"]), "prompt_token_ids": list(it["prompt_token_ids"]),
             "start": int(it.get("start", 0))} for j, job in enumerate(jobs) for it in job.items]
    if not rows:
        return
    if not ray.is_initialized():
        # a local cluster unless RAY_ADDRESS points at one; vLLM's own logs stay on the
        # replicas' stderr (they would interleave with the progress bar otherwise)
        ray.init(ignore_reinit_error=True, include_dashboard=False, log_to_driver=False,
                 logging_level="ERROR")
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
    tp = int(spec.vllm_kwargs.get("tensor_parallel_size", 1))
    cuda = _cuda()
    total_cpus = ray.cluster_resources().get("CPU", os.cpu_count() or 1)
    # every replica must be placeable at once, else Ray Data waits for one forever
    num_cpus = max(min(1.0, total_cpus / replicas), 0.01)
    name = f"uld_vllm_ranks_{uuid.uuid4().hex[:12]}"
    counter = _counter_actor(ray, name)
    bare = [Job(job.kind, [], job.sampling, job.mode) for job in jobs]
    try:
        # a few batches per replica: continuous batching inside a batch, and results (and
        # the progress bar) move more often than once per replica
        batch = max(1, math.ceil(len(rows) / (replicas * 4)))
        ds = ray.data.from_items(rows, override_num_blocks=max(1, math.ceil(len(rows) / batch)))
        ds = ds.map_batches(
            _Replica, batch_size=batch, concurrency=replicas, batch_format="numpy",
            fn_constructor_kwargs={"spec": spec, "jobs": bare, "replicas": replicas,
                                   "counter": name},
            num_cpus=0 if cuda else num_cpus, num_gpus=tp if cuda else 0, max_restarts=0)
        for row in ds.iter_rows():
            j, res = json.loads(row["result"])
            if progress is not None:
                progress.update(1, result_tokens(jobs[j].kind, res))
            yield j, res
    finally:
        ray.kill(counter)
