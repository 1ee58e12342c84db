"""The vLLM side of uld-vllm: ULD model classes, their settings, CLI flags and entry points.

Importing this package does not import vLLM; the modules that need it import it themselves.
"""
