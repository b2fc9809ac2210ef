"""One module per scenario; each registers itself with :func:`benchmarks.registry.scenario`."""
