"""Weight-editing unlearning baselines (GA, GD, NPO) and the full fine-tune they start from.

``uld-vllm baseline {ga,gd,npo}`` (``uld_vllm.baselines.cli``) runs one of them on a model
folder and writes a normal HF model folder that ``uld-vllm eval tofu`` evaluates.
"""

METHODS = ("ga", "gd", "npo")
