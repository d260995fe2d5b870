"""``python -m transferkit.cli``: the same as the ``transferkit`` command."""

import sys

from transferkit.cli import command

sys.exit(command())
