"""Model building (tiny and real-size random weights) and loading (hub id or local folder)."""
