#!/usr/bin/env python
"""Train a network on MNIST: ``python train.py`` (see ``python train.py --help``)."""

import sys

from xpnet.train.cli import main

if __name__ == "__main__":
    sys.exit(main())
