"""`python -m mole_core …` — see mole_core/cli.py."""
import sys

from mole_core.cli import main

sys.exit(main())
