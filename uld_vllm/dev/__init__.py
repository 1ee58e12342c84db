"""Developer tools: small random models and adapters for tests, smoke runs and benchmarks."""
