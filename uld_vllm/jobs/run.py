"""Run a list of jobs on one engine, or on N Ray replicas of it (``--replicas``)."""

from __future__ import annotations

from collections.abc import Iterator

from uld_vllm.jobs.spec import EngineSpec, set_uld_mode
from uld_vllm.jobs.stream import Job, Progress, stream


def run_jobs(engine, jobs: list[Job], *, replicas: int = 1,
             progress: Progress | None = None) -> Iterator[tuple[int, dict]]:
    """``(job index, result)`` as requests finish: the jobs one after the other on one built
    engine, or all of them on ``replicas`` Ray replicas built once from an ``EngineSpec``."""
    if replicas > 1:
        from uld_vllm.jobs.replicas import run_replicated  # Ray only when asked for

        if not isinstance(engine, EngineSpec):
            raise TypeError("replicas > 1 needs an EngineSpec, not a built engine")
        yield from run_replicated(engine, jobs, replicas, progress)
        return
    for j, job in enumerate(jobs):
        if job.mode is not None:
            set_uld_mode(engine, job.mode)
        for res in stream(engine, job.kind, job.items, job.sampling, progress):
            yield j, res
