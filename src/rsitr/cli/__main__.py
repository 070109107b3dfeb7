"""``python -m rsitr.cli``: the ``rsitr`` command."""
import sys

from rsitr.cli import main

sys.exit(main())
