"""KServe: the bundle `make kserve` writes and the replica sizing read from benchmark data."""
