"""``python -m cairn``: the ``cairn`` command."""

import sys

from cairn.cli import main

if __name__ == "__main__":
    sys.exit(main())
