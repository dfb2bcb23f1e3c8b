"""Helpers that run real parts (an etcd server, worker processes) for tests, the demo and benchmarks."""
