"""Benchmarks of this project (run from the checkout root as ``python -m bench.<name>``)."""
