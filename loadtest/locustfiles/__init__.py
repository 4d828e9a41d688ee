"""Locustfiles, one per example model; each defines a `Rest` and a `Grpc` user (pick one on the command line)."""
