"""``python -m tnlbt`` is the ``tnlbt`` command."""

import sys

from tnlbt.cli import main

sys.exit(main())
