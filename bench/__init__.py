"""Benchmarks: metahub against distribution's registry in proxy mode (see bench/README.md)."""
