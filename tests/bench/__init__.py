"""Benchmarks: run with ``python -m tests.bench.run``; nothing here is collected by pytest."""
