"""The serving check's parts, run by ``benchmarks/serve_check.py``: comparisons, process plumbing, SmolLM2, 7B."""
