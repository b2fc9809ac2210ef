"""Benchmarks: what the queue costs and what it is worth, as ratios against in-run baselines.

Run ``python -m benchmarks --help``. See ``benchmarks/README.md`` for the scenarios and results.
"""
