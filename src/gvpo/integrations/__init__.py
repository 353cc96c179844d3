"""Adapters that run GVPO inside other training libraries (optional dependencies, imported on demand)."""
