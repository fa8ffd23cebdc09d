"""Benchmarks: they print numbers measured in one run; they never pass or fail."""
