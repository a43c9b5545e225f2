"""``python -m gpuhnsw ...``: the same as the ``gpuhnsw`` command (see gpuhnsw/cli.py)."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
