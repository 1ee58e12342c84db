"""TOFU evaluation: per-example logs in the reference format and the metrics built from them."""
