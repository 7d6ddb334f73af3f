"""Benchmarks: encinfer against its peers (`make bench`)."""
