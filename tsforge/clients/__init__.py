"""Clients of a running TorchServe: predict (REST), gRPC stubs and client, deploy/rollback (management API)."""
