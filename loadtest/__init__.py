"""Load tests and benchmarks against a running TorchServe."""
