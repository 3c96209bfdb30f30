"""Data package: GPU model catalog and built-in partition profiles (YAML)."""
