"""``python -m xpnet.train``: the same command line as ``train.py``."""

import sys

from xpnet.train.cli import main

if __name__ == "__main__":
    sys.exit(main())
