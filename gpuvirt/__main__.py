"""``python -m gpuvirt``: the same entry point as the console script (the installed libvirt hook uses it)."""

from gpuvirt.cli import main

if __name__ == "__main__":
    main()
