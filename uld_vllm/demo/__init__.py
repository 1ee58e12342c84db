"""``uld-vllm demo``: the real story (``real``: SmolLM2 forgets Harry Potter) and the toy one
(``toy``: a 4-layer model trained here). Their data is in ``demo/data``."""
