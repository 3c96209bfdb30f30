"""Where the shipped data lives: the catalog (``profiles/``) and the Alembic revisions (``migrations/``).

An installed gpuvirt carries them as the packages ``gpuvirt._profiles`` and ``gpuvirt._migrations``. A
process started with ``python -m gpuvirt...`` or ``python -c`` from a source checkout imports the
checkout's ``gpuvirt/`` instead (the current directory comes first on ``sys.path``), and that directory
has no such packages: the data is then found at the top of the checkout, where it is kept.
"""

from __future__ import annotations

import importlib
import os


def data_dir(name: str) -> str:
    """The directory of ``profiles`` or ``migrations``, installed or in the source checkout."""
    try:
        pkg = importlib.import_module(f"gpuvirt._{name}")
        return os.path.dirname(pkg.__file__)
    except ModuleNotFoundError:
        checkout = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), name)
        if os.path.isdir(checkout):
            return checkout
        raise
