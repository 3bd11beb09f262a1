"""``python -m raysr.tune``: see :mod:`raysr.tune`."""

import sys

from raysr.tune.cli import build_parser, main

__all__ = ["build_parser", "main"]  # build_parser: how tests/test_cluster.py checks the documented command lines

if __name__ == "__main__":
    sys.exit(main())
