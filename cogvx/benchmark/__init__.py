"""Benchmarks of the project's own code at real sizes, side by side with the reference step."""
