"""Whole experiments built from the other commands (``uld-vllm experiment ...``)."""
