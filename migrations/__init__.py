"""Alembic migration environment for the gpuvirt inventory (shipped inside the package)."""
