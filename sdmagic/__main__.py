"""`python -m sdmagic run PROMPTS --out DIR`: the `sdmagic` command (see sdmagic/cli.py)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
