"""``python -m interpolatron.benchmark``: the same as ``interpolatron bench``."""

import sys

from . import main

sys.exit(main(prog="python -m interpolatron.benchmark"))
