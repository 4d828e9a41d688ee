"""Model declarations. Each module defines one `ModelSpec`; heavy imports stay inside factories."""
