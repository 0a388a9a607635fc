"""``python -m lorahub.cli ARGS`` is ``lorahub ARGS``."""

import sys

from . import main

sys.exit(main())
