"""Benchmarks of jit-proxy side by side with what users would use instead (run: python -m bench)."""
