"""Offline jobs on a built engine: the engine spec and its flags (``spec``), streaming requests
(``stream``), resumable output files (``partial``), Ray replicas (``replicas``), one job list
on one or N engines (``run``) and ``uld-vllm generate`` (``generate``)."""
