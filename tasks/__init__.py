"""Prefect tasks: thin wrappers over the cogvx library."""
