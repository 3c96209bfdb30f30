"""The parts of benches/placement.py, one module per part (B1, B2a, B2b, B2v, B3, B4, latency) and
what they share (common)."""
