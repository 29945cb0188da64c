"""`python -m mole_core …` — see mole_core/cli.py."""
import sys

from mole_core.cli import main

if __name__ == "__main__":
    sys.exit(main())
