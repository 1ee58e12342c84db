"""The pure core: ULD's maths, the adapter format, the shared-tensor assistant and the
two-model reference decoder. Imports torch and transformers only, never vLLM
(``tests/test_layers.py`` checks it), so training and the reference run without an engine.
"""
