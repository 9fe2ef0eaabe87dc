"""Prefect flows over the cogvx library."""
