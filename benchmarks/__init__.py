"""Benchmarks: each measures ptqflow's way against a baseline in the same run and reports the ratio."""
